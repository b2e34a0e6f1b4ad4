"""Streaming activation statistics: run the model in ORT with chosen tensors as outputs, reduce on the fly.

``collect_statistics`` reads the requested tensors through the capture engine
(``capture.stream_tensors``: chunks of tensors as graph outputs, one ORT pass over the batches per
chunk), folds each output into a ``TensorStats`` and drops the activation before the next run.
With ``StatsConfig.ranges_only`` it hands over to ``reductions.collect_ranges`` (min/max reduced
inside ORT, one pass per batch, no histogram).

Memory bound: peak ≈ (one batch's outputs for one chunk, as ORT returns them)
+ (one channel-last copy of one of those tensors, when its channel axis is not last)
+ (one float64 block of ``2**20`` values for |x|) + per tensor ``3·C + 2·P + 2·bins + 1`` numbers,
plus ORT's own working memory for one forward pass. Nothing grows with the number of samples N.

Determinism and merging: min/max and integer histogram counts are order-free; the histogram's
range is a power of two (the smallest that covers every |x|), so it does not depend on which batch
came first; the sum of |x| is kept exactly (float64 block sums added without rounding, Shewchuk's
partials, read out correctly rounded by ``math.fsum``). So statistics of shards of the data merged
with :meth:`TensorStats.merge` equal those of one pass over all of it bit for bit, in any grouping
(``distributed.py`` runs shards on a dask cluster).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from qcompiler.calibration.capture import stream_tensors
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.errors import QCompileError

#: |x| is histogrammed in blocks of this many values so the float64 temporary stays at 8 MiB.
_BLOCK = 1 << 20


@dataclass(frozen=True)
class StatsConfig:
    """How statistics are collected: histogram resolution, chunking, per-index stats, ORT threads."""

    histogram_bins: int = 2048
    tensors_per_run: int = 32
    #: Bytes of captured activations per ORT run and batch; None: sized from available memory.
    chunk_bytes: int | None = None
    #: Ranges only, reduced inside ORT in one pass per batch (``reductions.py``): no histogram or
    #: mean |x|. What the compile passes use; ``inspect`` needs the full statistics.
    ranges_only: bool = False
    per_index: bool = True
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.histogram_bins < 1 or self.tensors_per_run < 1:
            raise QCompileError(
                f"StatsConfig: histogram_bins ({self.histogram_bins}) and tensors_per_run "
                f"({self.tensors_per_run}) must be at least 1"
            )


@dataclass
class TensorStats:
    """Running statistics of one tensor over all calibration samples seen so far.

    Axis 0 is the batch axis. With C channels along ``channel_axis`` and P positions (the
    flattened remaining axes: pixels of an NCHW activation, tokens of a (B, T, C) one):
    ``channel_min/max/absmax`` have length C (``absmax = max(max, -min, 0)``) and
    ``index_min/max`` length P (None when per-index statistics are off). Tensors of rank ≤ 1
    are viewed as (B, 1): one channel. Non-finite values are counted in ``nonfinite`` and
    left out of every statistic.

    The histogram counts |x| in ``len(hist_counts)`` equal bins over ``[0, hist_edges[-1]]``
    (bins half-open, the last closed, as ``np.histogram``). The range R starts at the smallest
    power of two ≥ the first non-zero batch's abs-max; when a batch exceeds it, R is multiplied
    by the smallest power of two k that covers it and every k neighbouring bins are merged. A
    power of two makes the new edges bitwise equal to every k-th old edge (k·(R/bins) is exact),
    so the counts equal ``np.histogram(|all samples|, bins, range=(0, hist_edges[-1]))`` exactly,
    no data is read twice, and R = 2^⌈log2 absmax⌉ whatever the order of the batches.
    ``sum_abs`` is the correctly rounded sum of the per-block float64 sums (``_partials`` holds
    it exactly), so it too is independent of order and grouping.
    """

    name: str
    channel_axis: int
    channel_min: np.ndarray = field(repr=False)
    channel_max: np.ndarray = field(repr=False)
    hist_counts: np.ndarray = field(repr=False)
    hist_edges: np.ndarray = field(repr=False)
    index_min: np.ndarray | None = field(default=None, repr=False)
    index_max: np.ndarray | None = field(default=None, repr=False)
    samples: int = 0
    min: float = math.inf
    max: float = -math.inf
    absmax: float = 0.0
    shape: tuple[int, ...] = ()
    nonfinite: int = 0
    sum_abs: float = 0.0
    count: int = 0
    #: Per channel Σx (float64; finite values) over ``channel_rows`` values each: the channel means
    #: that bias correction needs. Summed in batch order, so shard merges agree to rounding, not bits.
    channel_sum: np.ndarray | None = field(default=None, repr=False)
    channel_rows: int = 0
    #: How many values equal hist_edges[-1] (held in the closed last bin); they move on growth.
    _top: int = field(default=0, repr=False)
    #: Non-overlapping float64 partials whose exact sum is Σ|x| (a handful, whatever N).
    _partials: list = field(default_factory=list, repr=False)

    @property
    def channel_absmax(self) -> np.ndarray:
        """Per channel ``max(max, -min, 0)``: 0 for a channel that saw no finite value."""
        return np.maximum(np.maximum(self.channel_max, -self.channel_min), 0.0)

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Per channel mean of the finite values seen (None before any data or without sums)."""
        if self.channel_sum is None or not self.channel_rows:
            return None
        return self.channel_sum / self.channel_rows

    def _add_channel_sum(self, batch_sum: np.ndarray, rows: int) -> None:
        batch_sum = np.asarray(batch_sum, np.float64).reshape(-1)
        self.channel_sum = batch_sum.copy() if self.channel_sum is None else self.channel_sum + batch_sum
        self.channel_rows += rows

    def mean_abs(self) -> float:
        """Mean of |x| over all finite values: ``sum_abs / count`` (0.0 before any data)."""
        return self.sum_abs / self.count if self.count else 0.0

    @classmethod
    def start(cls, name: str, array: np.ndarray, axis: int | None, bins: int, per_index: bool) -> TensorStats:
        """Empty statistics sized for ``array``'s channels and positions."""
        shape3, channel_axis = _layout(np.shape(array), axis, name)
        return cls(
            name=name, channel_axis=channel_axis,
            channel_min=np.full(shape3[2], np.inf), channel_max=np.full(shape3[2], -np.inf),
            hist_counts=np.zeros(bins, np.int64), hist_edges=np.zeros(bins + 1),
            index_min=np.full(shape3[1], np.inf) if per_index else None,
            index_max=np.full(shape3[1], -np.inf) if per_index else None,
            shape=tuple(np.shape(array)[1:]),
        )

    @classmethod
    def empty(cls, name: str, channel_axis: int, channels: int, positions: int | None) -> TensorStats:
        """Range-only statistics (no histogram), filled by :meth:`update_ranges` (``reductions.py``)."""
        return cls(name=name, channel_axis=channel_axis,
                   channel_min=np.full(channels, np.inf), channel_max=np.full(channels, -np.inf),
                   hist_counts=np.zeros(0, np.int64), hist_edges=np.zeros(1),
                   index_min=None if positions is None else np.full(positions, np.inf),
                   index_max=None if positions is None else np.full(positions, -np.inf))

    def update_ranges(self, parts: Mapping[str, np.ndarray], samples: int, source: str) -> None:
        """Fold one batch's ranges reduced in the graph: channel_min/max (C,), index_min/max (positions…)."""
        channel_min, channel_max = (np.asarray(parts[kind], np.float64).reshape(-1)
                                    for kind in ("channel_min", "channel_max"))
        shape3 = (samples, np.asarray(parts["index_min"]).size, channel_min.size)
        self._check_sizes(shape3, source)
        self.samples += samples
        np.minimum(self.channel_min, channel_min, out=self.channel_min)
        np.maximum(self.channel_max, channel_max, out=self.channel_max)
        if self.index_min is not None:
            np.minimum(self.index_min, np.asarray(parts["index_min"], np.float64).reshape(-1), out=self.index_min)
            np.maximum(self.index_max, np.asarray(parts["index_max"], np.float64).reshape(-1), out=self.index_max)
        self.min = min(self.min, float(channel_min.min()))
        self.max = max(self.max, float(channel_max.max()))
        self.absmax = max(self.absmax, self.max, -self.min, 0.0)
        self.count += samples * shape3[1] * shape3[2]
        if "channel_sum" in parts:
            self._add_channel_sum(parts["channel_sum"], samples * shape3[1])

    def folded(self, name: str, shift: np.ndarray | None, scale: np.ndarray) -> TensorStats:
        """Range statistics of X' = (X − z)/s per channel (s > 0), derived without a forward pass.

        x ↦ (x − z_c)/s_c is increasing on channel c, so min_c(X') = (min_c(X) − z_c)/s_c and
        max_c(X') = (max_c(X) − z_c)/s_c exactly (in real arithmetic; the runtime computes X' in
        float32, so a recaptured range may differ in the last bits); the per-tensor range is the
        min/max over channels, and Σ_c X' = (Σ_c X − z_c·n)/s_c. Per-position ranges mix channels
        of different s: not derivable, so they are None. Histograms are dropped (ranges only)."""
        scale = np.asarray(scale, np.float64).reshape(-1)
        shift = np.zeros_like(scale) if shift is None else np.asarray(shift, np.float64).reshape(-1)
        if scale.size != self.channel_min.size or np.any(scale <= 0):
            raise ValueError(f"folded '{self.name}': {scale.size} positive scales needed for "
                             f"{self.channel_min.size} channels")
        low, high = (self.channel_min - shift) / scale, (self.channel_max - shift) / scale
        derived = TensorStats.empty(name, self.channel_axis, low.size, None)
        derived.channel_min, derived.channel_max = low, high
        derived.samples, derived.count, derived.nonfinite, derived.shape = (self.samples, self.count,
                                                                              self.nonfinite, self.shape)
        if self.samples:
            derived.min, derived.max = float(low.min()), float(high.max())
            derived.absmax = max(derived.max, -derived.min, 0.0)
        if self.channel_sum is not None:
            derived._add_channel_sum((self.channel_sum - shift * self.channel_rows) / scale, self.channel_rows)
        return derived

    def update(self, array: np.ndarray, source: str) -> None:
        """Fold one batch (axis 0 = batch) into the statistics; ``source`` names it in errors."""
        array = _as_float(array)
        if max(array.ndim, 1) != len(self.shape) + 1:  # rank 0 and 1 share the (B, 1) view
            raise QCompileError(f"{source}: tensor '{self.name}' changed rank from {len(self.shape) + 1} "
                                f"to {array.ndim} between batches")
        shape3, _ = _layout(array.shape, self.channel_axis, self.name)
        self._check_sizes(shape3, source)
        self.samples += shape3[0]
        self.shape = tuple(array.shape[1:])
        if array.size == 0:
            return
        batched = array.reshape(shape3[0], 1) if array.ndim <= 1 else array
        view = np.moveaxis(batched, self.channel_axis, -1).reshape(shape3)
        finite = bool(np.isfinite(view).all())
        low = high = view
        if not finite:  # mask only when needed: the common case costs one boolean pass
            mask = np.isfinite(view)
            self.nonfinite += int(mask.size - np.count_nonzero(mask))
            low, high = np.where(mask, view, np.inf), np.where(mask, view, -np.inf)
        batch_min, batch_max = low.min(axis=(0, 1)), high.max(axis=(0, 1))
        np.minimum(self.channel_min, batch_min, out=self.channel_min)
        np.maximum(self.channel_max, batch_max, out=self.channel_max)
        finite_view = view if finite else np.where(mask, view, 0.0)
        self._add_channel_sum(finite_view.sum(axis=(0, 1), dtype=np.float64), shape3[0] * shape3[1])
        del finite_view
        if self.index_min is not None:
            np.minimum(self.index_min, low.min(axis=(0, 2)), out=self.index_min)
            np.maximum(self.index_max, high.max(axis=(0, 2)), out=self.index_max)
        self.min = min(self.min, float(batch_min.min()))
        self.max = max(self.max, float(batch_max.max()))
        batch_absmax = max(float(batch_max.max()), -float(batch_min.min()), 0.0)
        self.absmax = max(self.absmax, batch_absmax)
        del low, high, view
        self._grow_histogram(batch_absmax)
        flat = array.reshape(-1)
        for begin in range(0, flat.size, _BLOCK):
            block = np.abs(flat[begin:begin + _BLOCK], dtype=np.float64)
            if not finite:
                block = block[np.isfinite(block)]
            _add_exact(self._partials, float(block.sum()))
            self.count += block.size
            self._add_to_histogram(block)
        self.sum_abs = math.fsum(self._partials)

    def merge(self, other: TensorStats, source: str = "shard") -> None:
        """Fold in the statistics of other samples of the same tensor (a shard that comes later in
        the data): exact, so merging shards equals one pass over them bit for bit.

        Ranges, counts and histogram counts are order-free; ``shape`` is the later shard's, as one
        pass would leave it. Both must be full statistics or both ranges only."""
        if other.channel_axis != self.channel_axis or (other.hist_counts.size == 0) != (self.hist_counts.size == 0):
            raise QCompileError(f"{source}: statistics of tensor '{self.name}' do not match "
                                "(channel axis or histogram); they cannot be merged")
        self._check_sizes((0, other.index_min.size if other.index_min is not None else 0,
                           other.channel_min.size), source)
        if other.samples:
            self.shape = other.shape
        self.samples += other.samples
        np.minimum(self.channel_min, other.channel_min, out=self.channel_min)
        np.maximum(self.channel_max, other.channel_max, out=self.channel_max)
        if self.index_min is not None:
            np.minimum(self.index_min, other.index_min, out=self.index_min)
            np.maximum(self.index_max, other.index_max, out=self.index_max)
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.absmax = max(self.absmax, other.absmax)
        self.nonfinite += other.nonfinite
        self.count += other.count
        if other.channel_sum is not None:
            self._add_channel_sum(other.channel_sum, other.channel_rows)
        for partial in other._partials:
            _add_exact(self._partials, partial)
        self.sum_abs = math.fsum(self._partials)
        if self.hist_counts.size:
            other = replace(other)  # growing replaces its arrays: the caller's object stays as it was
            top = max(float(self.hist_edges[-1]), float(other.hist_edges[-1]))
            self._grow_histogram(top)
            other._grow_histogram(top)
            self.hist_counts = self.hist_counts + other.hist_counts
            self._top += other._top

    def _check_sizes(self, shape3: tuple[int, int, int], source: str) -> None:
        if shape3[2] != self.channel_min.size:
            raise QCompileError(
                f"{source}: tensor '{self.name}' has {shape3[2]} channels along axis {self.channel_axis}, "
                f"earlier batches had {self.channel_min.size}; pick a channel axis of fixed size"
            )
        if self.index_min is not None and shape3[1] != self.index_min.size:
            raise QCompileError(
                f"{source}: tensor '{self.name}' has {shape3[1]} positions per sample, earlier batches had "
                f"{self.index_min.size}; calibration files must share a sequence length (and image size) "
                "for per-index statistics, or set per_index=False"
            )

    def _grow_histogram(self, batch_absmax: float) -> None:
        """Widen the range R to R·k (k = 2^j ≥ batch_absmax / R) and merge bins k at a time."""
        bins, current = self.hist_counts.size, float(self.hist_edges[-1])
        if batch_absmax <= current:
            return
        if current == 0.0:  # only zeros so far: they stay in bin 0 of any range
            self.hist_edges = np.linspace(0.0, _power_of_two_above(batch_absmax), bins + 1)
            return
        factor = 1 << max(0, math.ceil(math.log2(batch_absmax / current)))
        while current * factor < batch_absmax:  # log2 may round down by one ulp
            factor *= 2
        merged = np.add.reduceat(self.hist_counts, np.arange(0, bins, min(factor, bins)))
        counts = np.zeros(bins, np.int64)
        counts[:merged.size] = merged
        if bins % factor == 0 and self._top:
            # Values equal to the old R sat in the closed last bin; R is now the left edge of bin bins/k.
            counts[bins // factor - 1] -= self._top
            counts[bins // factor] += self._top
        self.hist_counts, self._top = counts, 0
        self.hist_edges = np.linspace(0.0, current * factor, bins + 1)

    def _add_to_histogram(self, values: np.ndarray) -> None:
        """Count float64 |x| values (all ≤ R) into the bins, with np.histogram's edge rules."""
        bins, edges = self.hist_counts.size, self.hist_edges
        top = float(edges[-1])
        if top == 0.0:
            self.hist_counts[0] += values.size
            return
        index = (values * (bins / top)).astype(np.intp)
        np.minimum(index, bins - 1, out=index)
        # The scaled index can be off by one within an ulp of an edge; the edges decide.
        index -= values < edges[index]
        index += (values >= edges[index + 1]) & (index < bins - 1)
        self.hist_counts += np.bincount(index, minlength=bins)
        self._top += int(np.count_nonzero(values == top))


def _power_of_two_above(value: float) -> float:
    """The smallest power of two ≥ ``value`` (> 0); ``value`` itself beyond float64's largest one."""
    mantissa, exponent = math.frexp(value)  # value = mantissa · 2^exponent, 0.5 ≤ mantissa < 1
    try:
        return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
    except OverflowError:
        return value


def _add_exact(partials: list, value: float) -> None:
    """Add ``value`` to the exact sum held as non-overlapping partials (Shewchuk; ``math.fsum``'s
    own algorithm): every addition is error-free, so the sum is independent of order."""
    kept = 0
    for partial in partials:
        if abs(value) < abs(partial):
            value, partial = partial, value
        high = value + partial
        low = partial - (high - value)
        if low:
            partials[kept] = low
            kept += 1
        value = high
    partials[kept:] = [value]


def _as_float(array) -> np.ndarray:
    """float32/float64 as is; half, integer and bool tensors as float64 (exact for their values)."""
    array = np.asarray(array)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float64)


def _layout(shape: tuple[int, ...], axis: int | None, name: str) -> tuple[tuple[int, int, int], int]:
    """(batch, positions, channels) of a tensor and its non-negative channel axis."""
    if len(shape) <= 1:
        return (shape[0] if shape else 1, 1, 1), 1
    rank = len(shape)
    channel_axis = rank - 1 if axis is None else axis + rank if axis < 0 else axis
    if not 1 <= channel_axis < rank:
        raise QCompileError(f"tensor '{name}': channel axis {axis} is out of range for rank {rank} "
                            "(axis 0 is the batch axis); use 1..rank-1 or None for the last axis")
    positions = math.prod(shape[1:]) // shape[channel_axis] if shape[channel_axis] else 0
    return (shape[0], positions, shape[channel_axis]), channel_axis


def collect_statistics(model, batches: Sequence[CalibrationBatch],
                       tensors: Mapping[str, int | None],
                       config: StatsConfig = StatsConfig(), rows=None) -> dict[str, TensorStats]:
    """Statistics of every tensor in ``tensors`` (name -> channel axis, None = last) over all batches.

    Reduces the values of :func:`stream_tensors` on the fly. See the module docstring for the
    memory bound (independent of N). Returns the statistics in the order of ``tensors``.
    ``rows``: a ``row_samples.RowSampler`` that draws its rows in the same forward passes
    (``ranges_only`` statistics only).
    """
    batches = list(batches)
    if not batches:
        raise QCompileError("collect_statistics: no calibration batches; load some with load_calibration")
    if config.ranges_only:
        from qcompiler.calibration.reductions import collect_ranges

        return collect_ranges(model, batches, tensors, replace(config, ranges_only=False), rows)
    if rows is not None:
        raise ValueError("collect_statistics: row sampling rides on ranges_only statistics only")
    stats: dict[str, TensorStats] = {}
    for batch, values in stream_tensors(model, batches, list(tensors), config):
        for name, value in values.items():
            if name not in stats:
                stats[name] = TensorStats.start(name, value, tensors[name], config.histogram_bins, config.per_index)
            stats[name].update(value, batch.source)
        del values, value  # release this batch's activations before the generator runs the next
    return {name: stats[name] for name in tensors}
