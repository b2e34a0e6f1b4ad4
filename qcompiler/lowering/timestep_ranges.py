"""Per-timestep group ranges for DGQ (``dgq_groups --per-timestep``) and their simulated lowering.

Diffusion activations change range with the denoising step; one static range per group must cover
every step. With per-timestep ranges the K groups (labels) stay those of the whole calibration
set, and each group gets one (s, z) per calibrated timestep t:
    [min_g(t), max_g(t)] = [min over members of their min at t, max over members of their max at t]
    s_g(t) = (max_g(t) − min_g(t))/(2^b − 1),   z_g(t) = round(−min_g(t)/s_g(t))
At run time each batch row picks the calibrated timestep nearest to its own ``timestep`` input
(a TDQ table, one row per t in [0, T), is gathered at t itself):
    i = argmin_j |t − t_j|;   s = S[i][labels], z = Z[i][labels]   (Gather, broadcast over the row)
    X̂ = (clamp(round(X/s) + z, q_min, q_max) − z)·s
(One group per tensor, or groups along axis 1 — a Conv's channels, the tokens of (B, T, C) — run as
QuantizeLinear → DequantizeLinear along axis 0 of a flattened view, two passes instead of six; the
same numbers, bit for bit on the zoo UNet.) Round is half-to-even like QuantizeLinear, so at one
timestep this equals ``quant.fake_quantize`` with that timestep's parameters; the error bound is |X − X̂| ≤ s_g(t)/2 inside the range
calibrated at t. The scales are run-time tensors, which ORT's QDQ fusion does not take (it needs
constant scales): this fake-quantized form is simulated, and labelled so. The ORT target also has
an integer form that applies the same gathered scales to integer GEMMs' int32 sums
(``timestep_integer``); this one is its reference and the fallback where that is slower or impossible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.calibration.capture import stream_tensors
from qcompiler.calibration.statistics import StatsConfig, TensorStats
from qcompiler.errors import PassError
from qcompiler.quant import QuantSpec, scale_zero_point

LOWERING = "simulated (per-timestep group scales)"
TDQ_LOWERING = "simulated (TDQ run-time scales)"


def batch_timesteps(batch: CalibrationBatch, timestep_input: str) -> np.ndarray:
    """The timestep of every row: the ``__timestep__`` metadata, else the model input's value."""
    if "__timestep__" in batch.metadata:
        values = batch.metadata["__timestep__"]
    elif timestep_input in batch.feeds:
        values = batch.feeds[timestep_input]
    else:
        raise PassError(f"{batch.source}: per-timestep ranges need '__timestep__' metadata or the model input "
                        f"'{timestep_input}' in every calibration batch (collect it with `qcompile collect`)")
    return np.broadcast_to(np.asarray(values, dtype=np.float64).reshape(-1), (batch.batch_size,))


def split_by_timestep(batches: Sequence[CalibrationBatch], timestep_input: str) -> dict[float, list]:
    """Calibration rows regrouped by timestep: {t: [CalibrationBatch of the rows with that t]}."""
    by_t: dict[float, list[CalibrationBatch]] = {}
    for batch in batches:
        t = batch_timesteps(batch, timestep_input)
        for value in np.unique(t):
            rows = np.flatnonzero(t == value)
            if rows.size == t.size:
                part = batch
            else:
                part = CalibrationBatch({k: v[rows] if np.ndim(v) >= 1 else v for k, v in batch.feeds.items()},
                                        {k: v[rows] if np.ndim(v) >= 1 else v for k, v in batch.metadata.items()},
                                        f"{batch.source}[t={value:g}]")
            by_t.setdefault(float(value), []).append(part)
    return dict(sorted(by_t.items()))


def timestep_statistics(model, batches: Sequence[CalibrationBatch], tensors: dict[str, int | None],
                        timestep_input: str, progress: bool = True, threads: int | None = None) -> tuple[np.ndarray, dict[str, list[TensorStats]]]:
    """(timesteps ascending, {tensor: [its statistics at each timestep]}) in one pass over the data."""
    by_t = split_by_timestep(batches, timestep_input)
    timesteps = np.array(list(by_t), dtype=np.float64)
    index_of = {id(part): i for i, parts in enumerate(by_t.values()) for part in parts}
    ordered = [part for parts in by_t.values() for part in parts]
    config = StatsConfig(progress=progress, threads=threads)
    stats: dict[str, list] = {name: [None] * len(timesteps) for name in tensors}
    for batch, values in stream_tensors(model, ordered, list(tensors), config, desc="per-timestep statistics"):
        i = index_of[id(batch)]
        for name, value in values.items():
            if stats[name][i] is None:
                stats[name][i] = TensorStats.start(name, value, tensors[name], config.histogram_bins, True)
            stats[name][i].update(value, batch.source)
        del values
    return timesteps, stats


def timestep_parameters(per_t: list[TensorStats], axis: str, labels: np.ndarray,
                        spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(S, Z) of shape (T, K): each group's scale and zero point from its members' range at each t."""
    groups = int(labels.max()) + 1
    scales, zero_points = [], []
    for stats in per_t:
        low = stats.channel_min if axis == "channel" else stats.index_min
        high = stats.channel_max if axis == "channel" else stats.index_max
        low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
        group_min = np.array([low[labels == g].min() for g in range(groups)])
        group_max = np.array([high[labels == g].max() for g in range(groups)])
        s, z = scale_zero_point(group_min, group_max, spec)
        scales.append(s)
        zero_points.append(z)
    return np.stack(scales).astype(np.float32), np.stack(zero_points).astype(np.float32)


def covers_every_timestep(timesteps: np.ndarray) -> bool:
    """Whether the table has one row per integer timestep 0..T−1 (TDQ): row t is then gathered directly."""
    return bool(np.array_equal(timesteps, np.arange(timesteps.size)))


def timestep_index(b, timestep: gs.Tensor, timesteps: np.ndarray, x: gs.Tensor) -> gs.Variable:
    """The table row of each row of ``x``'s batch (int64, (B,)): t itself, clamped to [0, T−1], when
    the table covers every timestep; else the nearest calibrated timestep, i = argmin_j |t − t_j|.
    A one-element ``timestep`` (one t for the whole batch, as ``batch_timesteps`` reads it) is
    expanded to x's batch, so per-row parameters have one entry per row of x."""
    t = b.op("Cast", [timestep], np.float32, attrs={"to": onnx.TensorProto.FLOAT})
    if covers_every_timestep(timesteps):
        t = b.op("Clip", [b.op("Round", [t], np.float32), np.array(0, np.float32),
                          np.array(timesteps.size - 1, np.float32)], np.float32)
        index = b.op("Cast", [t], np.int64, attrs={"to": onnx.TensorProto.INT64})
    else:
        distance = b.op("Abs", [b.op("Sub", [b.op("Unsqueeze", [t, np.array([1], np.int64)], np.float32),
                                             timesteps.astype(np.float32).reshape(1, -1)], np.float32)], np.float32)
        index = b.op("ArgMin", [distance], np.int64, attrs={"axis": 1, "keepdims": 0})
    batch = b.op("Slice", [b.op("Shape", [x], np.int64), np.array([0], np.int64), np.array([1], np.int64)], np.int64)
    return b.op("Expand", [index, batch], np.int64)


def row_parameters(b, table: np.ndarray, labels: np.ndarray, index: gs.Tensor) -> gs.Variable:
    """(B, N) = table[index][:, labels]: the (T, K) table is stored, not its (T, N) expansion
    (a TDQ table has T = 1000 rows)."""
    rows = b.op("Gather", [np.ascontiguousarray(table, np.float32), index], np.float32, attrs={"axis": 0})
    if np.array_equal(labels, np.arange(table.shape[1])):  # one column per group already
        return rows
    return b.op("Gather", [rows, labels.astype(np.int64)], np.float32, attrs={"axis": 1})


def simulated_timestep_qdq(b, x: gs.Tensor, timestep: gs.Tensor, plan) -> gs.Variable:
    """X̂ with the scales of each row's nearest calibrated timestep (see the module docstring)."""
    rank = len(x.shape)
    axis = plan.channel_axis % rank if plan.axis == "channel" else (1 if rank == 3 else None)
    if axis is None:
        raise PassError(f"per-timestep ranges: '{x.name}' has pixel groups over a rank-{rank} tensor; "
                        "only channel groups or token groups of a (B, T, C) input are supported")
    index = timestep_index(b, timestep, plan.timesteps, x)
    if plan.groups == 1 or axis == 1:
        return _row_block_qdq(b, x, index, plan, per_row=plan.groups == 1)
    shape = np.array([0 if i == 0 else (-1 if i == axis else 1) for i in range(rank)], np.int64)
    scale = b.op("Reshape", [row_parameters(b, plan.timestep_scales, plan.labels, index), shape], np.float32)
    zero_point = b.op("Reshape", [row_parameters(b, plan.timestep_zero_points, plan.labels, index), shape],
                      np.float32)
    spec = plan.spec
    codes = b.op("Add", [b.op("Round", [b.op("Div", [x, scale], np.float32)], np.float32), zero_point], np.float32)
    codes = b.op("Clip", [codes, np.array(spec.qmin, np.float32), np.array(spec.qmax, np.float32)], np.float32)
    return b.op("Mul", [b.op("Sub", [codes, zero_point], np.float32), scale], np.float32)


def _row_block_qdq(b, x: gs.Tensor, index: gs.Tensor, plan, per_row: bool) -> gs.Variable:
    """X̂ as QuantizeLinear → DequantizeLinear along axis 0 of a flattened view: two passes over X.

    One group: X as (B, rest), one (s, z) per batch row. Groups along axis 1 (a Conv's channels, the
    tokens of (B, T, C)): X as (B·A, rest), one (s, z) per (row, index). The elementwise form above
    takes six passes; a per-axis QuantizeLinear runs block by block here (each block a contiguous
    row of the view), not element by element as it would along the innermost axis."""
    f32, flat = np.float32, np.array([-1], np.int64)
    labels = np.zeros(1, np.int64) if per_row else plan.labels
    scale = b.op("Reshape", [row_parameters(b, plan.timestep_scales, labels, index), flat], f32)
    zero = row_parameters(b, np.rint(plan.timestep_zero_points).astype(f32), labels, index)
    zero = b.op("Reshape", [b.op("Cast", [zero], np.uint8, attrs={"to": onnx.TensorProto.UINT8}), flat], np.uint8)
    view = b.op("Flatten", [x], f32, attrs={"axis": 1 if per_row else 2})
    codes = b.op("QuantizeLinear", [view, scale, zero], np.uint8, attrs={"axis": 0})
    if plan.spec.bits < 8:
        codes = b.op("Clip", [codes, np.array(plan.spec.qmin, np.uint8), np.array(plan.spec.qmax, np.uint8)], np.uint8)
    dequantized = b.op("DequantizeLinear", [codes, scale, zero], f32, attrs={"axis": 0})
    return b.op("Reshape", [dequantized, b.op("Shape", [x], np.int64)], f32)
