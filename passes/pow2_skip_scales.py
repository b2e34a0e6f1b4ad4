"""Pass ``pow2_skip_scales`` (DMQ PTS): per-channel power-of-two activation scales chosen by voting, lowered exactly.

Rewrite, per target input X (channels c) and its GEMMs (1×1 decoder shortcut Convs reading
concat(h, skip), and any Conv/Linear input whose channel-range ratio exceeds ``variance_ratio``):
    X → X/m ;  W → W·m        m_c = 2^(−j_c) ∈ {1, 1/2, 1/4, 1/8}          (folded by ``qcompiler.folding.fold``)
    X/m → DQ(Q(X/m; s, z))    s, z fixed from the calibrated range of the ORIGINAL X:
                              s = (max X − min X)/(2^b − 1), z = round(−min X/s)  (b = abits)
so channel c is quantized with scale s·m_c and the shared zero point z (docs/algorithms.md §5.3: "activation
scale for channel c is s·m_c"): x̂_c = s·m_c·(clamp(round(x_c/(s·m_c)) + z, 0, 2^b − 1) − z).
A channel with m_c < 1 gets a 2^j_c finer grid and clips at m_c·[min X, max X]. Dividing by a
power of two is exact in float, so Q(X/m; s, z) reproduces that per-channel quantizer bit for bit.

Voting: every calibration sample n (one batch row) votes, per channel c, for
    v_nc = argmin_{m ∈ (1, 1/2, 1/4, 1/8)} Σ_{positions of n} (x − x̂_m)²       (ties → the larger m)
and channel c takes the most common vote if at least ``agreement`` (85 %) of the samples cast it,
else m_c = 1. s and z are the per-tensor min/max parameters above (they do not depend on m).

Lowering (docs/algorithms.md §6):
- W4 (exact): Ŵ = s_w·Wq with Wq the int4 weight of the ORIGINAL W per output channel (MSE clip
  search with ``clip_search``); the GEMM weight becomes the int8 values Wq·2^(3−j_c) (|·| ≤ 56)
  with scale s_w/8 — equal to m_c·Ŵ — so X̂·Ŵ with per-channel activation scales s·m_c is ONE int8
  GEMM over a per-tensor uint8 activation (QLinearConv / MatMulIntegerToFloat), bit-identical to
  the simulated quantizer. Linear targets use this per-output-channel int8 container too (not
  MatMulNBits blocks).
- W8: int8 per output channel of the folded W·m (m folded before weight quantization). Not
  bit-identical to the simulated per-channel-scale quantizer: Q(W·m) ≠ m·Q(W).
Either way this pass writes its targets' weight DQ itself; ``quantize_weights`` skips them.
X/m costs nothing where a producer absorbs it (Norm affine, Linear/Conv output channels);
after a Concat (also read by the ResBlock's GroupNorm) it is one explicit Mul by 2^j_c (fallbacks).
Targets where every m_c = 1 are left to ``insert_activation_qdq`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.graph import constant_value
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.folding import ScaleGroup, find_scale_groups, fold
from qcompiler.lowering.qdq import insert_tensor_qdq
from qcompiler.les_training import collect_inputs, select_samples
from qcompiler.weight_quant import DEFAULT_CLIP_RATIOS, quantize_weight_clipped
from qcompiler.patterns import Conv, Linear, match_conv, match_linear, weight_array
from qcompiler.quant import QuantSpec, quantize_weight, scale_zero_point

#: Candidate multipliers m = 2^(−j), j = 0..3, in vote order (ties go to the first).
MULTIPLIERS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class Pow2SkipScalesConfig:
    #: Share of samples that must agree on a channel's vote (else m = 1).
    agreement: float = 0.85
    #: Also target inputs with max_c(range_c)/median_c(range_c) above this (None: skip concats only; on
    #: the UNet after LES no input exceeds 16, and the check costs one statistics pass over every input).
    variance_ratio: float | None = None
    include_skip_concat: bool = True
    #: Calibration samples (batch rows) that vote, spread over the calibration files.
    samples: int = 128
    #: MSE clip search for the int4 weights this pass lowers (W4).
    clip_search: bool = True
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS
    exclude_nodes: tuple[str, ...] = ()
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not 0.5 < self.agreement <= 1.0 or self.samples < 1:
            raise ValueError(f"Pow2SkipScalesConfig: 0.5 < agreement ≤ 1 and samples ≥ 1 required, got {self}")


def fake_quantize_channels(x: np.ndarray, multipliers: np.ndarray, scale: float, zero_point: int,
                           spec: QuantSpec, axis: int = -1) -> np.ndarray:
    """x̂_c = s·m_c·(clamp(round(x_c/(s·m_c)) + z, qmin, qmax) − z): the quantizer PTS lowers."""
    shape = [1] * x.ndim
    shape[axis] = len(multipliers)
    step = (np.float32(scale) * np.asarray(multipliers, np.float32)).reshape(shape)
    q = np.clip(np.rint(x.astype(np.float32) / step) + int(zero_point), spec.qmin, spec.qmax)
    return ((q - int(zero_point)) * step).astype(np.float32)


def vote(x: np.ndarray, samples: np.ndarray | None, scale: float, zero_point: int, spec: QuantSpec,
         agreement: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers m_c and each channel's agreement, from ``x`` (items, positions, C).

    ``samples[i]`` names the sample of item i (None: every item is a sample). Returns (m, share).
    """
    items, _, channels = x.shape
    errors = np.empty((items, channels, len(MULTIPLIERS)))
    for k, m in enumerate(MULTIPLIERS):
        x_hat = fake_quantize_channels(x, np.full(channels, m), scale, zero_point, spec)
        errors[..., k] = np.square(x - x_hat, dtype=np.float64).sum(axis=1)
    if samples is not None:
        per_sample = np.zeros((int(samples.max()) + 1, channels, len(MULTIPLIERS)))
        np.add.at(per_sample, samples, errors)
        errors = per_sample[np.unique(samples)]
    votes = np.argmin(errors, axis=-1)  # (samples, C); argmin keeps the first (largest m) on ties
    counts = np.stack([(votes == k).sum(axis=0) for k in range(len(MULTIPLIERS))], axis=-1)  # (C, 4)
    mode = counts.argmax(axis=-1)
    share = counts.max(axis=-1) / votes.shape[0]
    chosen = np.where(share >= agreement, np.asarray(MULTIPLIERS)[mode], 1.0)
    return chosen, share


def _skip_concat_source(tensor: gs.Tensor) -> gs.Node | None:
    """The Concat (of ≥ 2 activations) that writes ``tensor``, directly or through a constant Mul (a fold)."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Mul":
        variables = [t for t in node.inputs if constant_value(t) is None]
        node = variables[0].inputs[0] if len(variables) == 1 and variables[0].inputs else None
    if node is None or node.op != "Concat":
        return None
    return node if sum(constant_value(t) is None for t in node.inputs) >= 2 else None


def _is_shortcut(unit) -> bool:
    """A 1×1 Conv (group 1) whose input is a skip concat: the decoder ResBlock's shortcut."""
    if not isinstance(unit, Conv):
        return False
    weight = weight_array(unit)
    return (weight.ndim == 4 and weight.shape[2:] == (1, 1) and unit.node.attrs.get("group", 1) == 1
            and _skip_concat_source(unit.input) is not None)


def channel_range_ratio(channel_min: np.ndarray, channel_max: np.ndarray) -> float:
    """max_c(max_c − min_c) / median_c(max_c − min_c): how unequal the channels' ranges are."""
    ranges = np.asarray(channel_max, np.float64) - np.asarray(channel_min, np.float64)
    median = float(np.median(ranges))
    return float(ranges.max() / median) if median > 0 else float("inf") if ranges.max() > 0 else 1.0


class Pow2SkipScales(Pass):
    """X → X/m ; W → W·m with m_c ∈ {1, 1/2, 1/4, 1/8} by voting, activation QDQ at scale s (DMQ PTS).

    See the module docstring for the per-channel quantizer, the vote and the exact W4 lowering.
    Not an equivalence pass: it inserts the targets' activation QDQ (and W4 integer weights).
    """

    name = "pow2_skip_scales"
    Config = Pow2SkipScalesConfig

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "to vote")

    def targets(self, ctx: CompileContext) -> list[tuple[ScaleGroup, str]]:
        """(group, why) for every input the pass rewrites; the reasons are 'skip concat' or 'range ratio'."""
        config = self.config
        groups = [g for g in find_scale_groups(ctx.graph, include_conv=True)
                  if g.channels > 1 and not any(u.node.name in config.exclude_nodes for u in g.consumers)
                  and all(isinstance(u, Linear) or weight_array(u).ndim == 4 for u in g.consumers)]
        chosen = []
        ratio_candidates = []
        for group in groups:
            if config.include_skip_concat and all(_is_shortcut(u) for u in group.consumers):
                chosen.append((group, "skip concat"))
            elif config.variance_ratio is not None:
                ratio_candidates.append(group)
        if ratio_candidates:
            stats = ctx.statistics({g.name: g.channel_axis for g in ratio_candidates}, progress=config.progress)
            for group in ratio_candidates:
                ratio = channel_range_ratio(stats[group.name].channel_min, stats[group.name].channel_max)
                if ratio > config.variance_ratio:
                    chosen.append((group, f"range ratio {ratio:.1f}"))
        return chosen

    def call(self, ctx: CompileContext) -> PassResult:
        config = self.config
        targets = self.targets(ctx)
        if not targets:
            return PassResult(False, ("no skip-concat shortcut or high-variance input found",))
        stats = ctx.statistics({g.name: g.channel_axis for g, _ in targets}, progress=config.progress)
        stats = {g.name: (float(stats[g.name].min), float(stats[g.name].max)) for g, _ in targets}
        batches = select_samples(ctx.calibration, config.samples, config.seed)
        values = collect_inputs(ctx, batches, [g.name for g, _ in targets])
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        notes, histogram, rewritten = [], {m: 0 for m in MULTIPLIERS}, 0
        for group, why in targets:
            x, rows = values.pop(group.name)
            x = np.moveaxis(x, group.channel_axis, -1)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            low, high = stats[group.name]
            scale, zero_point = scale_zero_point(low, high, spec)
            multipliers, share = vote(x, rows, float(scale), int(zero_point), spec, config.agreement)
            counts = {m: int(np.sum(multipliers == m)) for m in MULTIPLIERS}
            for m, count in counts.items():
                histogram[m] += count
            names = ", ".join(u.node.name for u in group.consumers)
            text = "/".join(str(counts[m]) for m in MULTIPLIERS)
            notes.append(f"'{names}' ({why}): m = 1/½/¼/⅛ on {text} channels")
            details = {"multipliers": multipliers.tolist(), "agreement": share.round(3).tolist(),
                       "activation_scale": float(scale), "zero_point": int(zero_point), "target": why}
            if np.all(multipliers == 1.0):
                ctx.records.append(QuantRecord(names, group.name, "pts", "all m = 1", "left to insert_activation_qdq",
                                               self.name, details))
                continue
            self._rewrite(ctx, group, multipliers, float(low), float(high), spec, details)
            rewritten += 1
        ctx.graph.cleanup().toposort()
        total = sum(histogram.values())
        notes.insert(0, f"{len(targets)} targets, {rewritten} rewritten; channels with m = 1/½/¼/⅛: "
                        + "/".join(str(histogram[m]) for m in MULTIPLIERS) + f" of {total}")
        return PassResult(rewritten > 0, tuple(notes))

    def _rewrite(self, ctx: CompileContext, group: ScaleGroup, multipliers: np.ndarray, low: float, high: float,
                 spec: QuantSpec, details: dict) -> None:
        consumers = [unit.node for unit in group.consumers]
        original = {node.name: weight_array(match_conv(node) if node.op == "Conv" else match_linear(node))
                    for node in consumers}
        fold(ctx, group, multipliers, None, self.name)  # X/m (producer or explicit Mul), W·m
        x_scaled = consumers[0].inputs[0]
        for node in consumers:
            self._integer_weight(ctx, node, original[node.name], multipliers)
        scale, zero_point = scale_zero_point(low, high, spec)
        why = (f"qcompile {self.name}: {spec.describe()} activation of the PTS-scaled skip input; range "
               f"[{low:.6g}, {high:.6g}] after the power-of-two multipliers")
        insert_tensor_qdq(ctx, x_scaled, consumers, float(scale), int(zero_point), spec, self.name, why,
                          output_side=False)
        lowering = ("one int8 GEMM, int4 weights shifted by 2^(3−j) (exact)" if ctx.settings.wbits == 4
                    else "m folded into W before int8 weight quantization (not bit-identical)")
        for node in consumers:
            ctx.records.append(QuantRecord(node.name, group.name, "pts", f"per-channel s·m_c, {spec.describe()}",
                                           lowering, self.name, details))

    def _integer_weight(self, ctx: CompileContext, node: gs.Node, weight: np.ndarray,
                        multipliers: np.ndarray) -> None:
        """W4: W·m → DQ(Wq·2^(3−j_c) int8, s_w/8) with Wq the int4 of the original W per output channel.
        W8: W·m → DQ(int8(W·m), s_w) per output channel (m folded before quantization)."""
        unit = match_conv(node) if node.op == "Conv" else match_linear(node)
        out_axis, in_axis = unit.weight_out_axis, unit.weight_in_axis
        bits = ctx.settings.wbits
        wspec = QuantSpec(bits=bits, symmetric=True, granularity="axis", axis=out_axis)
        source = weight if bits == 4 else weight_array(unit)  # W8: the folded W·m
        if self.config.clip_search:
            q, scale, zero_point = quantize_weight_clipped(source, wspec, self.config.clip_ratios)
        else:
            q, scale, zero_point = quantize_weight(source, wspec)
        if bits == 4:
            shape = [1] * weight.ndim
            shape[in_axis] = len(multipliers)
            shift = np.rint(8 * multipliers).astype(np.int16).reshape(shape)  # 2^(3−j_c)
            q, scale = (q.astype(np.int16) * shift).astype(np.int8), scale / 8
        names, base = ctx.names, unit.weight.name
        dq_out = gs.Variable(names.make(base, self.name, "dequantized"), dtype=np.float32, shape=list(weight.shape))
        dq = gs.Node("DequantizeLinear", names.make(base, self.name, "DequantizeLinear"), attrs={"axis": out_axis},
                     inputs=[ctx.constant(names.make(base, self.name, "int8"), q),
                             ctx.constant(names.make(base, self.name, "scale"), scale.astype(np.float32)),
                             ctx.constant(names.make(base, self.name, "zero_point"), np.zeros_like(zero_point))],
                     outputs=[dq_out])
        dq.doc_string = (f"qcompile {self.name}: int4 sym per-channel weight of {node.op} '{node.name}' times "
                         "2^(3−j_c) per input channel (PTS multipliers m_c = 2^(−j_c)) in int8, scale s_w/8"
                         if bits == 4 else f"qcompile {self.name}: int8 sym per-channel weight of {node.op} "
                         f"'{node.name}' with the PTS multipliers folded in before quantization")
        ctx.graph.nodes.append(dq)
        node.inputs[1] = dq_out
        lowering = "int8 container, int4 values shifted by PTS" if bits == 4 else "DequantizeLinear"
        ctx.records.append(QuantRecord(node.name, base, "weight", wspec.describe(), lowering, self.name))
