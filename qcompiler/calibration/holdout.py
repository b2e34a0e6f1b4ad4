"""Held-out calibration rows: fit a grid on some rows, score it on rows it never saw.

Grids fitted to calibration extremes (DGQ's per-group ranges above all) can be much narrower
than what the same model produces for other prompts and seeds. On the zoo UNet, with every 4th
row of each timestep file as the fit set, held-out rows exceed a K = 16 channel group's range
by up to 40–1200 of that group's steps, against 0–150 per-tensor steps for the tensor's own
range. Scoring candidate grids on held-out rows measures that, instead of assuming it.

The split is by row inside each batch (rows are prompts/seeds of one diffusion step, so every
timestep stays in both sets): row i of a batch is held out when ``i % every == every − 1``.
Where batches hold fewer rows than ``every``, whole batches are held out instead (every
``every``-th batch). With fewer than ``every`` rows and batches in all there is no split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.quant import QuantSpec, dequantize, group_ranges, quantize, scale_zero_point, shared_zero_point


@dataclass(frozen=True)
class HoldoutSplit:
    fit: list[CalibrationBatch]
    held_out: list[CalibrationBatch]
    by: str  # "row" | "batch"

    @property
    def held_out_count(self) -> int:
        return sum(batch.batch_size for batch in self.held_out)


def _rows(batch: CalibrationBatch, keep: np.ndarray) -> CalibrationBatch:
    """The rows ``keep`` of every batched feed (feeds without the batch axis are shared)."""
    size = batch.batch_size

    def cut(value):
        value = np.asarray(value)
        return value[keep] if value.ndim >= 1 and value.shape[0] == size else value

    return CalibrationBatch({k: cut(v) for k, v in batch.feeds.items()},
                            {k: cut(v) for k, v in batch.metadata.items()}, batch.source)


def split_holdout(batches: Sequence[CalibrationBatch], every: int = 4) -> HoldoutSplit | None:
    """Hold out one row in ``every`` of each batch (or one batch in ``every``); None when too few."""
    if every < 2 or not batches:
        return None
    if all(batch.batch_size >= every for batch in batches):
        fit, held = [], []
        for batch in batches:
            index = np.arange(batch.batch_size)
            fit.append(_rows(batch, index % every != every - 1))
            held.append(_rows(batch, index % every == every - 1))
        return HoldoutSplit(fit, held, "row")
    if len(batches) >= every:
        return HoldoutSplit([b for i, b in enumerate(batches) if i % every != every - 1],
                            [b for i, b in enumerate(batches) if i % every == every - 1], "batch")
    return None


def grid_error(rows: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmax: int,
               channel_weights: np.ndarray | None = None) -> float:
    """Σ (x − x̂)² of ``rows`` (n, C) on the asymmetric grid (scale, zero point) per channel, clipping
    included; with ``channel_weights`` (C,) each channel's sum is weighted (e.g. by ‖Ŵ_c‖², which
    makes it the GEMM output's error for independent errors)."""
    spec = QuantSpec(bits=int(qmax).bit_length())  # asymmetric, codes 0..qmax
    codes = quantize(rows, scale, zero_point, spec, axis=-1)
    error = dequantize(codes, scale, zero_point, axis=-1).astype(np.float64) - rows
    per_channel = np.square(error).sum(axis=0)
    return float(per_channel.sum() if channel_weights is None else per_channel @ channel_weights)


def widen(group_min: np.ndarray, group_max: np.ndarray, tensor_min: float, tensor_max: float,
          margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Group ranges moved toward the tensor's range by ``margin`` (0: unchanged, 1: the tensor range)."""
    return group_min + margin * (tensor_min - group_min), group_max + margin * (tensor_max - group_max)


@dataclass(frozen=True)
class GridScores:
    """Held-out Σ(x − x̂)² of one tensor's candidate grids: per tensor, and groups at each margin
    with their own zero points (``free``) or one shared zero point (``shared``)."""

    margins: tuple[float, ...]
    tensor_error: float
    free: tuple[float, ...]
    shared: tuple[float, ...]

    def choose(self, min_gain_db: float, shared_ops: int = 1, free_ops: int = 2) -> tuple[float, bool] | None:
        """(margin, shared zero point) of the groups to keep, or None where per-tensor wins.

        Each elementwise op the lowering adds at run time (``shared_ops`` with one shared zero point,
        ``free_ops`` with the groups' own) must buy ``min_gain_db`` of held-out gain: groups beat
        per-tensor by ``min_gain_db`` × their ops, free zero points beat a shared one by as much per
        extra op. Groups a producer absorbs for free (0 ops) need only a positive gain."""
        free, shared = int(np.argmin(self.free)), int(np.argmin(self.shared))
        best_shared, best_free = self.shared[shared], self.free[free]
        use_free = _gain_db(best_shared, best_free) >= min_gain_db * max(free_ops - shared_ops, 0)
        best, ops = (best_free, free_ops) if use_free else (best_shared, shared_ops)
        gain = _gain_db(self.tensor_error, best)
        if gain < min_gain_db * ops or gain <= 0.0:
            return None
        return (self.margins[free], False) if use_free else (self.margins[shared], True)

    def gain_db(self) -> float:
        """The best grouped grid against per-tensor."""
        return _gain_db(self.tensor_error, min(min(self.free), min(self.shared)))


def _gain_db(reference: float, error: float) -> float:
    return float(10.0 * np.log10(max(reference, 1e-30) / max(error, 1e-30)))


def score_grids(rows: np.ndarray, low: np.ndarray, high: np.ndarray, labels: np.ndarray,
                margins: Sequence[float], spec: QuantSpec, channel_weights: np.ndarray | None = None,
                weight_error: Callable[[np.ndarray], np.ndarray] | None = None) -> GridScores:
    """Held-out error of the groups ``labels`` (ranges from the fit channels' ``low``/``high``) at each
    margin, with free or shared zero points, against one per-tensor grid over [min low, max high];
    ``channel_weights`` as in ``grid_error``.

    ``weight_error(r)`` (per channel, for the ratios r_c = s_c/max s of a grid): the error of the
    GEMM weight re-quantized as diag(r)·W, which is how one integer GEMM runs channel groups
    (``lowering.channel_affine``: it computes Σ_c x̂_c·Ŵ'_c/r_c). Each candidate then also pays
    Σ_c weight_error(r)_c·Σ_t x_c², so groups whose narrow scales cost more weight precision than they
    save in activation error lose to the per-tensor grid (r ≡ 1, its own weight error)."""
    rows = np.asarray(rows, np.float32)
    group_min, group_max = group_ranges(low, high, labels)
    scale, zero_point = scale_zero_point(low.min(), high.max(), spec)
    energy = np.square(rows.astype(np.float64)).sum(axis=0)

    def score(scales: np.ndarray, zero_points: np.ndarray) -> float:
        error = grid_error(rows, scales, zero_points.astype(np.float32), spec.qmax, channel_weights)
        if weight_error is None:
            return error
        scales = np.broadcast_to(np.asarray(scales, np.float64), (rows.shape[1],))
        return error + float(weight_error(scales / scales.max()) @ energy)

    tensor_error = score(np.asarray(scale), np.asarray(zero_point))
    free, shared = [], []
    for margin in margins:
        widened = widen(group_min, group_max, low.min(), high.max(), margin)
        scales, zero_points = scale_zero_point(*widened, spec)
        free.append(score(scales[labels], zero_points[labels]))
        sigma, z = shared_zero_point(*widened, spec)
        shared.append(score(sigma[labels], np.asarray(z)))
    return GridScores(tuple(margins), tensor_error, tuple(free), tuple(shared))


def held_out_rows(ctx, batches: Sequence[CalibrationBatch], axes: Mapping[str, int], rows: int,
                  seed: int) -> Mapping[str, np.ndarray]:
    """Up to ``rows`` rows (n, C) of each tensor (name -> channel axis) from the held-out batches
    (``row_samples.sampled_rows``: drawn inside ORT, spilled, joined per tensor when read)."""
    from qcompiler.calibration.row_samples import sampled_rows

    return sampled_rows(ctx, batches, axes, rows, seed)
