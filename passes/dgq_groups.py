"""Pass ``dgq_groups`` (DGQ): choose the grouping axis of every quantized GEMM input and its K groups.

Analysis (docs/algorithms.md §5.4), per activation X that feeds a quantized Linear/Conv, from calibration:
    per index i of axis d ∈ {channel, pixel}: a^max_i = max X over everything but i, a^min_i likewise
    D_d = (max_i a^max_i − min_i a^max_i) + (max_i a^min_i − min_i a^min_i),   d* = argmax_d D_d
Groups: K-means (scikit-learn, ``random_state=0``, ``n_init=10``) on the points (a^min_i, a^max_i)
of the chosen axis, K = ``groups`` (default 16 for W8, 8 for W4 as in the paper); each group g
takes its members' range [min a^min, max a^max] and the asymmetric parameters of docs/algorithms.md §3:
    s_g = (max_g − min_g)/(2^b − 1),  z_g = round(−min_g/s_g)        (``quant.scale_zero_point``)
"pixel" means the positions of the tensor: tokens of a (B, T, C) input, pixels of an NCHW one.
Conv inputs use channel groups (``conv_axis="channel"``, the design's choice); ``"auto"`` lets
d* pick pixel groups, which the lowering can only simulate. A pixel plan needs the positions'
sizes to be static in the graph (a scale per position); where they are not, the tensor falls
back to channel groups and the pass's notes say so (``on_dynamic_pixels="error"`` raises).

Error bound: every calibrated value lies in its group's range, so |X − X̂| ≤ s_g/2 inside it; a
group's s_g is at most the per-tensor scale, since its range is a subset of the tensor's.
The plans go on the context (``ctx.group_plans``); the target's lowering stage turns them into ops.
With ``per_timestep`` each group also gets one (s, z) per calibrated timestep, looked up at run
time from the model's ``timestep`` input (``timestep_ranges``; simulated, no integer kernel).

Held-out validation (``validate``, not in the paper; docs/algorithms.md §5.4): group ranges are
calibration extremes of fewer values than the tensor's range, so prompts and seeds outside the
calibration set exceed them far more often. One row in ``holdout_every`` of each calibration
batch is held out (``calibration.holdout``); on the rest, per channel-grouped tensor, K-means
groups are fitted and widened toward the tensor range by each margin m:
    [min_g + m·(min_T − min_g), max_g + m·(max_T − max_g)]      (m = 0: DGQ; m = 1: per-tensor)
and scored on the held-out rows by Σ_c ‖Ŵ_c‖²·Σ(x_c − x̂_c)², clipping included (the error of the
GEMM outputs, ‖Ŵ_c‖² summed over the tensor's readers), against the per-tensor grid. Each margin
is scored with the groups' own zero points and with one shared zero point (``quant.shared_zero_point``:
δ = 0 in the target's affine, so one Div at run time and a Conv's zero padding stays exact).
Each elementwise op the target's lowering adds at run time (``ctx.affine_ops``: ORT needs none where
a Norm absorbs the affine, a Div, an Add for free zero points, a Pad before a padded Conv) must buy
``min_gain_db``: free zero points are used only if they beat the shared one by that much per extra
op, and the tensor keeps groups (with the best m, applied to the ranges of all the data) only if
they beat per-tensor by ``min_gain_db`` × their ops (any gain where they cost none); otherwise it
gets no plan and ``insert_activation_qdq`` quantizes it per tensor. Pixel (token) plans are
not validated, nor are plans with per-timestep ranges (their gain comes from t, which a static score
does not see; adding ``tdq`` to a recipe, ``--tdq``, turns validation off for the same reason) or K = 1. With too little data to split, every tensor keeps its DGQ plan (noted).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from qcompiler.calibration.holdout import widen
from qcompiler.context import CompileContext
from qcompiler.errors import PassError
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.grids import GroupPlan, quantized_gemms
from qcompiler.quant import QuantSpec, group_ranges, scale_zero_point, shared_zero_point

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DgqGroupsConfig:
    #: K; None takes the paper's default for the weight width: 16 at W8, 8 at W4.
    groups: int | None = None
    conv_axis: str = "channel"  # "channel" | "auto"
    on_dynamic_pixels: str = "channel"  # "channel" (fall back, noted) | "error"
    seed: int = 0
    #: Per-timestep group ranges (diffusion denoisers; lowered by the target, see ``timestep_ranges``).
    per_timestep: bool = False
    timestep_input: str = "timestep"
    #: Keep channel groups only where they beat per-tensor on held-out calibration rows.
    validate: bool = True
    holdout_every: int = 4
    margins: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5)
    min_gain_db: float = 1.0
    #: Score each input channel's error by its readers' ‖Ŵ_c‖² (the GEMM output error), not equally.
    weigh_by_weights: bool = True
    #: Held-out rows scored per tensor (spread over the held-out batches).
    holdout_rows: int = 512

    def __post_init__(self):
        if self.holdout_every < 2 or self.holdout_rows < 1 or not self.margins:
            raise ValueError(f"DgqGroupsConfig: holdout_every ≥ 2, holdout_rows ≥ 1 and at least one margin "
                             f"are required, got {self}")
        if any(not 0.0 <= m <= 1.0 for m in self.margins):
            raise ValueError(f"DgqGroupsConfig: margins must lie in [0, 1], got {self.margins}")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"DgqGroupsConfig: groups must be at least 1, got {self.groups}")
        if self.conv_axis not in ("channel", "auto"):
            raise ValueError(f"DgqGroupsConfig: conv_axis must be 'channel' or 'auto', got {self.conv_axis!r}")
        if self.on_dynamic_pixels not in ("channel", "error"):
            raise ValueError(f"DgqGroupsConfig: on_dynamic_pixels must be 'channel' or 'error', "
                             f"got {self.on_dynamic_pixels!r}")


def axis_spread(index_min: np.ndarray, index_max: np.ndarray) -> float:
    """D_d = (max a^max − min a^max) + (max a^min − min a^min) over the indices of one axis."""
    return float(np.ptp(index_max) + np.ptp(index_min))


def kmeans_labels(points: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """K-means labels of ``points`` (n, 2), renumbered by ascending group centre (min + max)/2.

    K is capped at the number of distinct points (K-means cannot make more non-empty groups);
    renumbering makes the labels independent of scikit-learn's cluster order."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    distinct = np.unique(points, axis=0).shape[0]
    k = min(groups, distinct)
    if k <= 1:
        return np.zeros(points.shape[0], dtype=np.int64)
    # One thread: a few thousand 2-D points take milliseconds, while OpenMP's worker threads spin for
    # ~1 s per call on a busy machine. The labels do not depend on the thread count.
    with threadpool_limits(1):
        raw = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(points).labels_
    centres = np.array([points[raw == g].mean() for g in range(k)])
    order = np.argsort(centres, kind="stable")
    return np.argsort(order)[raw].astype(np.int64)


def _finite(values: np.ndarray) -> np.ndarray:
    """An index that never saw a finite value has ±inf bounds: treat it as the value 0."""
    return np.where(np.isfinite(values), values, 0.0)


def static_pixels(tensor: gs.Tensor, channel_axis: int, positions: int) -> bool:
    """Whether the graph fixes the sizes of every axis but batch and channel (product = positions)."""
    shape = tensor.shape
    if not shape or len(shape) < 3:
        return False
    axis = channel_axis % len(shape)
    sizes = [shape[i] for i in range(1, len(shape)) if i != axis]
    return all(isinstance(s, int) and s > 0 for s in sizes) and math.prod(sizes) == positions


class DgqGroups(Pass):
    """Picks d* = argmax(D_channel, D_pixel) per GEMM input and K-means groups along it."""

    name = "dgq_groups"
    Config = DgqGroupsConfig

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "for per-index ranges")
        if self.config.per_timestep and self.config.timestep_input not in {i.name for i in ctx.graph.inputs}:
            raise PassError(f"pass '{self.name}': per_timestep needs the model input '{self.config.timestep_input}' "
                            f"(set dgq_groups.timestep_input); the model's inputs are "
                            f"{[i.name for i in ctx.graph.inputs]}")

    def call(self, ctx: CompileContext) -> PassResult:
        notes: list[str] = []
        targets = self._targets(ctx, notes)
        plans: dict[str, GroupPlan] = {}
        ctx.group_plans = plans
        if not targets:
            return PassResult(False, ("no quantized GEMM input to group", *notes))
        wanted = {name: axis for name, (_, axis) in targets.items()}
        groups = self.config.groups or (16 if ctx.settings.wbits == 8 else 8)
        # Per-timestep ranges gain from t, which a static held-out score cannot see; one group is the
        # per-tensor range itself. Neither is validated.
        split = None
        if self.config.validate and not self.config.per_timestep and groups > 1:
            from qcompiler.calibration.holdout import split_holdout

            split = split_holdout(ctx.calibration, self.config.holdout_every)
            if split is None:
                notes.append(f"too little calibration data to hold out 1 row in {self.config.holdout_every}: "
                             "groups not validated")
        # With a split, the fit and held-out rows' statistics come from one pass over the data and
        # merge into the whole set's (exact for ranges), which ctx.statistics then serves from its cache;
        # the held-out rows are drawn in the held-out part's forward passes (no capture pass of their own).
        fit, sampler = None, None
        if split is not None:
            sampler = self._holdout_sampler(ctx, split, targets)
            fit = ctx.statistics_of_parts(wanted, [split.fit, split.held_out], rows=sampler)[0]
        stats = ctx.statistics(wanted)
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        axes = {name: self._axis(tensor, axis, stats[name], notes) for name, (tensor, axis) in targets.items()}
        grids: dict[str, tuple[float, bool] | None] = {name: (0.0, False) for name in targets}
        if split is not None:
            channel_grouped = {name: targets[name] for name, a in axes.items() if a == "channel"}
            grids.update(self._validated_grids(ctx, channel_grouped, groups, spec, split, fit, sampler, notes))
        for name, (tensor, axis) in targets.items():
            if grids[name] is not None:
                plans[name] = self._plan(tensor, axis, stats[name], axes[name], groups, spec, *grids[name])
        if self.config.per_timestep:
            self._add_timestep_ranges(ctx, plans, targets, spec, notes)
        by_axis = {a: sum(p.axis == a for p in plans.values()) for a in ("channel", "pixel")}
        return PassResult(False, ((f"planned {len(plans)} of {len(targets)} tensors (K ≤ {groups}): "
                                  f"{by_axis['channel']} channel groups, {by_axis['pixel']} pixel groups"), *notes))

    def _add_timestep_ranges(self, ctx: CompileContext, plans: dict[str, GroupPlan], targets: dict,
                             spec: QuantSpec, notes: list[str]) -> None:
        """S(t), Z(t) per plan from one extra pass over the calibration data grouped by timestep."""
        from qcompiler.lowering.timestep_ranges import (
            timestep_parameters,
            timestep_statistics,
        )

        timesteps, per_t = timestep_statistics(ctx.skeleton(), ctx.calibration,
                                               {name: axis for name, (_, axis) in targets.items()},
                                               self.config.timestep_input, threads=ctx.threads)
        for name, plan in plans.items():
            plan.timesteps, plan.timestep_input = timesteps, self.config.timestep_input
            plan.timestep_scales, plan.timestep_zero_points = timestep_parameters(per_t[name], plan.axis,
                                                                                  plan.labels, spec)
        notes.append(f"per-timestep group ranges at {timesteps.size} calibrated timesteps (gathered by timestep)")

    def _targets(self, ctx: CompileContext, notes: list[str]) -> dict[str, tuple[gs.Tensor, int | None]]:
        """GEMM inputs without an activation QDQ yet, with their channel axis (1 for Conv, last else)."""
        consumers: dict[str, tuple[gs.Tensor, set[str]]] = {}
        for node in quantized_gemms(ctx.graph):
            tensor = node.inputs[0]
            if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
                continue
            consumers.setdefault(tensor.name, (tensor, set()))[1].add(node.op)
        targets = {}
        for name, (tensor, ops) in consumers.items():
            if "Conv" in ops and ops != {"Conv"}:
                notes.append(f"'{name}' feeds both Conv and MatMul, whose channel axes differ; it keeps "
                             "per-tensor activation quantization")
                continue
            targets[name] = (tensor, 1 if ops == {"Conv"} else None)
        return targets

    def _axis(self, tensor: gs.Tensor, channel_axis: int | None, stats, notes: list[str]) -> str:
        """d* = argmax(D_channel, D_pixel), where the config and the graph allow pixel groups."""
        d_channel = axis_spread(_finite(stats.channel_min), _finite(stats.channel_max))
        d_pixel = axis_spread(_finite(stats.index_min), _finite(stats.index_max))
        axis = "channel" if d_channel >= d_pixel else "pixel"
        if channel_axis == 1 and self.config.conv_axis == "channel":
            return "channel"
        if axis == "pixel" and not static_pixels(tensor, stats.channel_axis, stats.index_min.size):
            if self.config.on_dynamic_pixels == "error":
                raise PassError(f"pass '{self.name}': '{tensor.name}' has D_pixel > D_channel but its "
                                f"positions are not static in the graph (shape {tensor.shape}); a scale per "
                                "position needs a fixed sequence length / image size")
            notes.append(f"'{tensor.name}' prefers pixel groups (D_pixel {d_pixel:.4g} > D_channel "
                         f"{d_channel:.4g}) but its shape {tensor.shape} is not static; channel groups used instead")
            return "channel"
        return axis

    def _holdout_sampler(self, ctx: CompileContext, split, targets: dict):
        """The ``RowSampler`` of up to ``holdout_rows`` held-out rows of every target, which rides on
        the held-out part's statistics pass (None on a cluster: ``_validated_grids`` then samples).
        Every target is sampled, since the axis choice needs the statistics; the draws are keyed by
        the targets' order, as ``held_out_rows`` keys them by the channel-grouped ones'."""
        from qcompiler.calibration.capture import default_chunk_bytes
        from qcompiler.calibration.row_samples import RowSampler

        if ctx.cluster is not None:
            return None
        axes = {name: (-1 if axis is None else axis) for name, (_, axis) in targets.items()}
        per_batch = -(-self.config.holdout_rows // max(len(split.held_out), 1))
        # Tensors with a run-time row count come back whole rather than cost a shape-probe pass when
        # one held-out batch of them fits an eighth of the available memory (not a quarter of the
        # weights: they are int8 by now, and the whole tensors are freed batch by batch).
        return RowSampler(axes, per_batch, self.config.seed, list(axes), len(split.held_out), ctx.threads,
                          keep=ctx.spill, whole_bytes=default_chunk_bytes())

    def _validated_grids(self, ctx: CompileContext, targets: dict, groups: int, spec: QuantSpec, split,
                         fit: dict, sampler, notes: list[str]) -> dict[str, tuple[float, bool] | None]:
        """Per channel-grouped tensor: (margin, shared zero point) of the best grouped grid on held-out
        rows, or None where per-tensor wins (``GridScores.choose``). ``fit``: statistics of the
        split's fit rows; ``sampler``: the held-out rows drawn with them (``_holdout_sampler``), or
        None to draw them in a pass of their own."""
        from qcompiler.calibration.holdout import held_out_rows, score_grids
        from qcompiler.calibration.row_samples import RowSamples

        if not targets:
            return {}
        axes = {name: (-1 if axis is None else axis) for name, (_, axis) in targets.items()}
        if sampler is not None and sampler.done:
            rows = RowSamples(sampler.samples, self.config.holdout_rows)
        else:
            rows = held_out_rows(ctx, split.held_out, axes, self.config.holdout_rows, self.config.seed)
        energy = self._channel_energy(ctx, targets) if self.config.weigh_by_weights else {}
        readers = self._weighted_readers(ctx, targets) if self.config.weigh_by_weights else {}
        chosen: dict[str, tuple[float, bool] | None] = {}
        for name in targets:
            low, high = _finite(fit[name].channel_min), _finite(fit[name].channel_max)
            labels = kmeans_labels(np.stack([low, high], axis=1), groups, self.config.seed)
            scores = score_grids(rows[name], low, high, labels, self.config.margins, spec, energy.get(name),
                                 self._weight_error(readers.get(name, [])))
            chosen[name] = scores.choose(self.config.min_gain_db, *self._run_time_ops(ctx, targets[name][0]))
            log.debug("%s: held-out gain %.2f dB, choice %s", name, scores.gain_db(), chosen[name])
        kept = [c for c in chosen.values() if c is not None]
        notes.append(f"held-out validation ({split.held_out_count} rows held out by {split.by}): {len(kept)} of "
                     f"{len(chosen)} channel-grouped tensors keep groups ({sum(c[1] for c in kept)} with one "
                     f"shared zero point), each beating per-tensor by ≥ {self.config.min_gain_db} dB per "
                     "elementwise op its lowering adds at run time (free where a Norm absorbs it); the "
                     "others are quantized per tensor")
        return chosen

    @staticmethod
    def _run_time_ops(ctx: CompileContext, tensor) -> tuple[int, int]:
        """(ops with a shared zero point, ops with free ones) the target adds to run this tensor's groups."""
        if ctx.affine_ops is None:
            return 1, 2
        return ctx.affine_ops(tensor, True), ctx.affine_ops(tensor, False)

    @staticmethod
    def _channel_energy(ctx: CompileContext, targets: dict) -> dict[str, np.ndarray]:
        """Per tensor: Σ over its quantized GEMM readers of ‖Ŵ_c‖² per input channel c."""
        from qcompiler.lowering.channel_affine import input_channel_energy

        energy: dict[str, np.ndarray] = {}
        for node in quantized_gemms(ctx.graph):
            name = node.inputs[0].name
            if name in targets:
                energy[name] = energy.get(name, 0.0) + input_channel_energy(node)
        return energy

    @staticmethod
    def _weighted_readers(ctx: CompileContext, targets: dict) -> dict[str, list]:
        """Per tensor: (node, weight rule) of each quantized GEMM reading it."""
        readers: dict[str, list] = {}
        for node in quantized_gemms(ctx.graph):
            name, rule = node.inputs[0].name, ctx.weight_rules.get(node.name)
            if name in targets and rule is not None:
                readers.setdefault(name, []).append((node, rule))
        return readers

    @staticmethod
    def _weight_error(readers: list):
        """r ↦ Σ over the readers of their weight error when diag(r)·W is re-quantized, as one integer
        GEMM runs channel groups (``RescaledWeightError``). Built for one tensor at a time: each
        probe holds a column sample of its weight (tens of MB on SD-1.5's widest Convs)."""
        from qcompiler.lowering.channel_affine import RescaledWeightError

        if not readers:
            return None
        probes = [RescaledWeightError(node, rule) for node, rule in readers]
        return lambda ratio: sum(probe(ratio) for probe in probes)

    def _plan(self, tensor: gs.Tensor, channel_axis: int | None, stats, axis: str, groups: int, spec: QuantSpec,
              margin: float = 0.0, shared: bool = False) -> GroupPlan:
        channel_min, channel_max = _finite(stats.channel_min), _finite(stats.channel_max)
        index_min, index_max = _finite(stats.index_min), _finite(stats.index_max)
        low, high = (channel_min, channel_max) if axis == "channel" else (index_min, index_max)
        labels = kmeans_labels(np.stack([low, high], axis=1), groups, self.config.seed)
        group_min, group_max = group_ranges(low, high, labels)
        group_min, group_max = widen(group_min, group_max, low.min(), high.max(), margin)
        scales, zero_points = scale_zero_point(group_min, group_max, spec)
        if shared:
            scales, zero_point = shared_zero_point(group_min, group_max, spec, scales)
            zero_points = np.full_like(zero_points, zero_point)
        mean = stats.channel_mean if axis == "channel" else None
        return GroupPlan(tensor.name, axis, -1 if channel_axis is None else channel_axis, labels, scales,
                         zero_points, group_min, group_max, spec.bits, axis_spread(channel_min, channel_max),
                         axis_spread(index_min, index_max), channel_mean=mean)
