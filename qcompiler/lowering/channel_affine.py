"""DGQ groups at per-tensor cost: an exact affine that turns K group grids into one per-tensor grid.

For a plan with groups (s_g, z_g) along the channels (the GEMM's reduction axis) pick one grid
(s, z) for the whole tensor: s = max_g s_g and z = the rounded mean of z_g (any integer in range is
exact; this one keeps δ small). With r_c = s_g(c)/s ≤ 1 and δ_c = s_g(c)·(z − z_g(c)), DGQ's code
q_c = clamp(round(x_c/s_g) + z_g) dequantizes as
    x̂_c = s_g·(q_c − z_g) = r_c·s·(q_c − z) + δ_c,
so   Σ_c x̂_c·W[c, n] + b_n = Σ_c s·(q_c − z)·W'[c, n] + b'_n,   W' = diag(r)·W,  b' = b + δ·W.
The integer codes are DGQ's codes, unchanged; one per-tensor DequantizeLinear(s, z) feeds one GEMM
(an integer kernel), and W' is re-quantized per output channel by the rule that chose W's grid:
Ŵ' = diag(r)·W + ε, |ε| ≤ s'_w/2 per element. The bias takes δ through Ŵ', not W
(``fold_affine``): b' = b + Σ_c (δ_c/r_c)·Ŵ'[c, n], so the GEMM computes Σ_c x̂_c·Ŵ'[c, n]/r_c and
the only error added to DGQ's is x̂_c·ε[c, n]/r_c. (b + δ·W would leave −Σ_c (δ_c/r_c)·ε[c, n] on
every output even where x̂ = 0: an offset that grows with δ/r.)

The codes come from one of (cheapest first):
- a Norm producer that absorbs x' = (x − δ)/r into its affine (γ/r, (β − δ)/r), then a per-tensor
  QuantizeLinear(s, z): round(x'/s) + z = round(x/s_g) + z_g (free at run time);
- Div(s_g) → Add(z_g) → QuantizeLinear(1, 0): two elementwise ops. A per-axis
  QuantizeLinear(s_g, z_g) would be one op, but ORT runs it element by element when the channel
  axis is the innermost one, and its layout optimizer makes a Conv input's channel axis innermost
  (NHWC) often enough that the per-axis form cost 70 of 133 ms per UNet call at W8A8
  (``benchmarks/profile_ops.py``); ``codes_per_axis`` is kept for token rows (axis 1 of (B, T, C)).
Both are DGQ's codes except where x/s_g lies within float rounding of a .5 tie.
Token (pixel) groups of a MatMul commute with it: rows scaled after one integer GEMM,
    Y[t, n] = r_t·(Σ_c s·(q − z)·Ŵ[c, n]) + δ_t·Σ_c Ŵ[c, n].
A padded Conv reads zeros of x, which the per-tensor grid would not map to 0: an explicit Pad of x
(value 0) before the QuantizeLinear keeps it exact, and the Conv's own pads become 0. Plans whose
groups share one zero point (``dgq_groups`` chooses them where held-out data shows no loss) have
δ = 0: x = 0 keeps code z, the Conv keeps its pads, and the codes take one op, Div(s_g) → Q(1, z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.folding import along_axis
from qcompiler.graph import constant_value
from qcompiler.grids import GroupPlan, WeightRule
from qcompiler.lowering.channel_groups import Builder, dequantized_weight, weight_dq
from qcompiler.lowering.matmul_nbits import dequantize_matmul_nbits, pack_matmul_nbits, unpack_matmul_nbits
from qcompiler.quant import QuantSpec, element_params
from qcompiler.skeleton import fresh_map
from qcompiler.weight_quant import quantize_by_rule


@dataclass(frozen=True)
class GroupAffine:
    """One per-tensor grid (s, z) and the per-index affine (r, δ) that maps DGQ's groups onto it."""

    scale: np.float32
    zero_point: int
    index_scale: np.ndarray  # s_g per index of the grouped axis (float32)
    index_zero_point: np.ndarray  # z_g per index (uint8)

    @property
    def ratio(self) -> np.ndarray:
        return self.index_scale.astype(np.float64) / float(self.scale)

    @property
    def shift(self) -> np.ndarray:
        return self.index_scale.astype(np.float64) * (self.zero_point - self.index_zero_point.astype(np.float64))

    @property
    def shared_zero_point(self) -> bool:
        """Every group has the tensor's zero point: δ = 0, so x = 0 keeps code z (padding stays exact)."""
        return bool(np.all(self.index_zero_point == self.zero_point))


def group_affine(plan: GroupPlan) -> GroupAffine:
    spec = plan.spec
    index_zero_point = plan.element_zero_point()
    zero_point = int(np.clip(np.rint(index_zero_point.astype(np.float64).mean()), spec.qmin, spec.qmax))
    return GroupAffine(np.float32(plan.scales.max()), zero_point, plan.element_scale().astype(np.float32),
                       index_zero_point.astype(np.uint8))


def codes_per_axis(b: Builder, x: gs.Tensor, affine: GroupAffine, axis: int, spec: QuantSpec) -> gs.Tensor:
    """QuantizeLinear(x, s_g, z_g, axis): DGQ's codes, bit for bit."""
    q = b.op("QuantizeLinear", [x, affine.index_scale, affine.index_zero_point], np.uint8, attrs={"axis": axis})
    return b.narrow(q, spec)


def codes_scaled(b: Builder, x: gs.Tensor, affine: GroupAffine, axis: int, rank: int, spec: QuantSpec) -> gs.Tensor:
    """Div(x, s_g) → Add(z_g) → QuantizeLinear(1, 0): DGQ's codes up to float rounding at .5 ties."""
    scaled = b.op("Div", [x, along_axis(affine.index_scale, axis, rank)], np.float32)
    shifted = b.op("Add", [scaled, along_axis(affine.index_zero_point.astype(np.float32), axis, rank)], np.float32)
    q = b.op("QuantizeLinear", [shifted, np.array(1.0, np.float32), np.array(0, np.uint8)], np.uint8)
    return b.narrow(q, spec)


def codes_divided(b: Builder, x: gs.Tensor, affine: GroupAffine, axis: int, rank: int, spec: QuantSpec) -> gs.Tensor:
    """Div(x, s_g) → QuantizeLinear(1, z) for a shared zero point: one elementwise op; DGQ's codes up
    to float rounding at .5 ties."""
    scaled = b.op("Div", [x, along_axis(affine.index_scale, axis, rank)], np.float32)
    q = b.op("QuantizeLinear", [scaled, np.array(1.0, np.float32), np.array(affine.zero_point, np.uint8)], np.uint8)
    return b.narrow(q, spec)


def codes_per_tensor(b: Builder, x_absorbed: gs.Tensor, affine: GroupAffine, spec: QuantSpec) -> gs.Tensor:
    """QuantizeLinear(x', s, z) on x' = (x − δ)/r written by the producer."""
    q = b.op("QuantizeLinear", [x_absorbed, np.array(affine.scale), np.array(affine.zero_point, np.uint8)],
             np.uint8)
    return b.narrow(q, spec)


def dequantize(b: Builder, codes: gs.Tensor, affine: GroupAffine) -> gs.Tensor:
    """The one per-tensor DequantizeLinear(s, z) that the target fuses into the GEMM."""
    return b.op("DequantizeLinear", [codes, np.array(affine.scale), np.array(affine.zero_point, np.uint8)],
                np.float32)


def conv_padding(node: gs.Node) -> list[int] | None:
    """The Conv's explicit pads when any is non-zero (they move to a Pad of x), else None."""
    pads = [int(p) for p in node.attrs.get("pads", [])]
    return pads if any(pads) else None


def pad_input(b: Builder, x: gs.Tensor, pads: list[int]) -> gs.Tensor:
    """Pad(x, 0) with the Conv's [begin..., end...] pads on the spatial axes (N and C unpadded)."""
    half = len(pads) // 2
    onnx_pads = np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64)
    return b.op("Pad", [x, onnx_pads, np.array(0.0, np.float32)], np.float32, attrs={"mode": "constant"})


def weight_in_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 1
    if node.op == "Gemm":
        return 1 if node.attrs.get("transB", 0) else 0
    return 0  # MatMul [K, N], MatMulNBits (unpacked to [K, N])


def _float_weight(node: gs.Node) -> np.ndarray:
    """Ŵ as the GEMM computes with it (MatMulNBits unpacked to [K, N], Gemm's α folded in)."""
    if node.op == "MatMulNBits":
        k, block = int(node.attrs["K"]), int(node.attrs["block_size"])
        q = unpack_matmul_nbits(constant_value(node.inputs[1]), k)
        scales = constant_value(node.inputs[2]).reshape(q.shape[0], -1)
        return dequantize_matmul_nbits(q, scales, block).astype(np.float64)
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    return dequantized_weight(node).astype(np.float64) * alpha


def weight_channel_energy(weight: np.ndarray, in_axis: int) -> np.ndarray:
    """Σ of W² over every axis but ``in_axis`` (outputs and kernel taps), per input channel, in float64."""
    moved = np.moveaxis(np.asarray(weight, np.float64), in_axis, 0)
    return np.square(moved).reshape(moved.shape[0], -1).sum(axis=1)

def input_channel_energy(node: gs.Node) -> np.ndarray:
    """Σ over everything but the input channel c of Ŵ²: how much an error on input channel c moves
    the GEMM's outputs (E‖ΔY‖² = Σ_c E[Δx_c²]·‖Ŵ_c‖² for independent errors). With per-output
    scales and zero point 0 (Ŵ = q·s_n): Σ_n s_n²·Σ_taps q², the integer squares summed exactly in
    float32, so no float copy of Ŵ is made (SD-1.5's widest Convs: 118 MB each in float64)."""
    found = weight_dq(node) if node.op != "MatMulNBits" else None
    if found is None:
        return weight_channel_energy(_float_weight(node), weight_in_axis(node))
    q, scale, out_axis = found
    in_axis = weight_in_axis(node)
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    squares = np.square(q.astype(np.float32))
    taps = tuple(a for a in range(q.ndim) if a not in (in_axis, out_axis))
    per_pair = squares.sum(axis=taps) if taps else squares  # exact: integers below 2^24
    per_pair = per_pair if in_axis < out_axis else per_pair.T  # [in, out]
    return (per_pair.astype(np.float64) @ np.square(scale.astype(np.float64))) * alpha**2


def output_correction(node: gs.Node, shift: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """δ·Ŵ per output channel: Σ_c δ_c Ŵ[c, n] (Conv: summed over the kernel taps too); ``weight``
    replaces the node's dequantized Ŵ (same layout)."""
    weight = _float_weight(node) if weight is None else weight
    if node.op == "Conv":  # [O, I, taps…]: the taps summed first (contiguous), then one matrix-vector product
        return weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2) @ shift
    return np.dot(shift, np.moveaxis(weight, weight_in_axis(node), 0))  # BLAS reads a transposed view as is


def fold_affine(b: Builder, node: gs.Node, ratio: np.ndarray, shift: np.ndarray, rule: WeightRule,
                mean: np.ndarray | None = None) -> None:
    """The GEMM reads x' = (x − δ)/r: W' = diag(r)·W re-quantized (``rescale_weight``), then
    b' = b + Σ_c (δ_c/r_c)·Ŵ'[c, n] from the re-quantized Ŵ' the GEMM runs (see the module docstring:
    from Ŵ instead, W''s rounding error times δ/r would stay on every output).

    With the calibrated channel means μ (``mean``), also b' −= Σ_c μ_c·(Ŵ'[c, n]/r_c − W[c, n]):
    empirical bias correction (Nagel et al., 2019, "Data-Free Quantization", §4.2) of the weight
    error the GEMM runs. Re-quantizing diag(r)·W magnifies channel c's weight error by ~1/r_c, and
    a weight error is the same on every input, so on activations with a non-zero mean (GELU and
    SiLU outputs) it is a per-output offset that deeper layers and sampling steps accumulate; this
    takes out its mean over the calibration data (zero-mean inputs: no change).

    Both terms are one correction, Σ_c ((δ_c − μ_c)/r_c)·Ŵ'[c, n] + Σ_c μ_c·W[c, n]: W is read once
    and Ŵ' dequantized once, with no weight-sized difference formed."""
    source = _source_weight(node, rule)  # read once: re-quantized here, compared below
    rescale_weight(b, node, ratio, rule, source)
    ratio = np.asarray(ratio, np.float64)
    shift = np.asarray(shift, np.float64)
    if not np.any(shift) and mean is None:
        return
    mean = None if mean is None else np.asarray(mean, np.float64)
    through_deployed = (shift if mean is None else shift - mean) / ratio  # (δ − μ)/r
    correction = output_correction(node, through_deployed, _float_weight(node))
    if mean is not None:
        correction = correction + output_correction(node, mean, source)
    add_output_bias(b, node, correction)


def _weight_shape(node: gs.Node) -> tuple[int, ...]:
    """The shape of Ŵ as ``_float_weight`` returns it, without dequantizing it."""
    if node.op == "MatMulNBits":
        return int(node.attrs["K"]), int(node.attrs["N"])
    return tuple(node.inputs[1].inputs[0].inputs[0].shape)


def _out_axis(node: gs.Node) -> int:
    """The output-channel axis of Ŵ (the axis its grid quantizes each slice of on its own)."""
    return 1 if node.op == "MatMulNBits" else weight_dq(node)[2]


def _source_weight(node: gs.Node, rule: WeightRule, keep: np.ndarray | None = None) -> np.ndarray:
    """W as the GEMM multiplies (Gemm's α folded in): the float weight the rule was computed from when
    the rule kept it (so W' is rounded once), else Ŵ; ``keep``: only those output channels (read
    from the source alone, so a probe never holds the whole weight).

    A memory-mapped source is read through a map of its own that ends here, so the pages read leave
    the resident set: read through ``rule.source`` itself, they stayed for as long as the rule lives
    (PixArt-α dgq: the held-out probes and the affine lowering read every weight, 2.9 GiB of file
    pages resident at the compile's peak)."""
    if rule.source is not None and rule.source.shape == _weight_shape(node):
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        source = fresh_map(rule.source)
        if keep is not None:
            source = np.take(source, keep, axis=_out_axis(node))
        return source.astype(np.float64) * alpha
    weight = _float_weight(node)
    return weight if keep is None else np.take(weight, keep, axis=_out_axis(node))


def _rescaled_grid(node: gs.Node, weight: np.ndarray, ratio: np.ndarray, rule: WeightRule):
    """(diag(r)·W in the layout its grid quantizes, that grid's codes, scale and zero point, the spec);
    MatMulNBits blocks quantize W'ᵀ [N, K]."""
    scaled = (weight * along_axis(ratio, weight_in_axis(node), weight.ndim)).astype(np.float32)
    if node.op == "MatMulNBits":
        scaled = np.ascontiguousarray(scaled.T)
        spec = QuantSpec(bits=4, symmetric=True, granularity="block", axis=1, block_size=int(node.attrs["block_size"]))
    else:
        spec = QuantSpec(bits=rule.bits, symmetric=True, granularity="axis", axis=weight_dq(node)[2])
    return (scaled, *quantize_by_rule(scaled, spec, rule), spec)


def rescale_weight(b: Builder, node: gs.Node, ratio: np.ndarray, rule: WeightRule,
                   source: np.ndarray | None = None) -> None:
    """W' = diag(r)·W along the input axis, quantized by ``rule`` (per output channel, or int4 blocks)."""
    source = _source_weight(node, rule) if source is None else source
    _, q, scale, zero_point, spec = _rescaled_grid(node, source, ratio, rule)
    if node.op == "MatMulNBits":
        node.inputs[1] = b.const("int4_packed", pack_matmul_nbits(q, spec.block_size))
        node.inputs[2] = b.const("int4_scale", scale.astype(np.float32).reshape(-1))
        return
    if node.op == "Gemm":
        node.attrs["alpha"] = 1.0  # folded into Ŵ above
    node.inputs[1] = b.op("DequantizeLinear", [q, scale.astype(np.float32), zero_point], np.float32,
                          attrs={"axis": spec.axis})


class RescaledWeightError:
    """Per input channel c, Σ over the rest of (W − Ŵ'/r)², with Ŵ' = ``rescale_weight``'s grid on
    diag(r)·W. The affine lowering computes x̂_c·Ŵ'_c/r_c, so this is the weight error channel c
    carries in the deployed GEMM (r ≡ 1: the rule's own error; a small r_c magnifies it by ~1/r_c).

    Each output channel n is quantized on its own, so the error is a sum over n and at most
    ``columns`` of them are scored (``scale_search.column_draw``): the ``columns // 2`` of largest
    Σ s_n² (their grid steps, hence their errors, are the largest: about K·s_n²/12) exactly, and a
    seeded uniform draw from the rest, each weighted by (rest)/(drawn). Unbiased, with the heavy
    columns' variance removed; only the kept columns of W are ever read (not the whole weight)."""

    def __init__(self, node: gs.Node, rule: WeightRule, columns: int = 128, seed: int = 0):
        from qcompiler.scale_search import column_draw

        heaviness = _column_heaviness(node)
        keep, share = None, np.ones(heaviness.size)
        if heaviness.size > columns:
            keep, share = column_draw(heaviness, columns, np.random.default_rng([seed, heaviness.size]))
        self.weight = _source_weight(node, rule, keep)
        self.node, self.rule = node, rule
        self.share = along_axis(share, _out_axis(node), self.weight.ndim)

    def __call__(self, ratio: np.ndarray) -> np.ndarray:
        scaled, q, scale, zero_point, spec = _rescaled_grid(self.node, self.weight, ratio, self.rule)
        s, z = element_params(scaled, spec, np.asarray(scale), np.asarray(zero_point))
        error = q.astype(np.float64)  # one buffer, updated in place: (q − z)·s/r, then (W − ·)²·share
        if np.any(z):
            error -= z
        error *= s
        error = error.T if self.node.op == "MatMulNBits" else error
        axis = weight_in_axis(self.node)
        error /= along_axis(np.asarray(ratio, np.float64), axis, self.weight.ndim)
        np.subtract(self.weight, error, out=error)
        np.square(error, out=error)
        error *= self.share
        return error.sum(axis=tuple(a for a in range(error.ndim) if a != axis))


def _column_heaviness(node: gs.Node) -> np.ndarray:
    """Σ s² of each output channel's weight grid (its scale; the sum of its blocks' for int4)."""
    if node.op == "MatMulNBits":
        scales = constant_value(node.inputs[2]).astype(np.float64)
        return np.square(scales.reshape(int(node.attrs["N"]), -1)).sum(axis=1)
    return np.square(weight_dq(node)[1].astype(np.float64))


def add_output_bias(b: Builder, node: gs.Node, correction: np.ndarray) -> None:
    """b' = b + correction on the GEMM's output channels: into Conv's B, Gemm's C, a MatMul's bias Add,
    or a new Add after the GEMM."""
    correction = correction.astype(np.float64)
    if node.op == "Conv" or (node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 1.0):
        if len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
            bias = constant_value(node.inputs[2])
            node.inputs[2] = b.const("bias", (bias.astype(np.float64) + correction.reshape(bias.shape)).astype(np.float32))
            return
        if len(node.inputs) == 2:
            node.inputs.append(b.const("bias", correction.astype(np.float32)))
            return
    found = _bias_add(b.ctx.graph, node, correction.size)
    if found is not None:
        add, other = found
        bias = constant_value(add.inputs[other])
        add.inputs[other] = b.const("bias", (bias.astype(np.float64) + correction.reshape(bias.shape)).astype(np.float32))
        return
    output = node.outputs[0]
    inner = gs.Variable(b.ctx.names.make(output.name, b.pass_name, "unbiased"), dtype=np.float32)
    node.outputs[node.outputs.index(output)] = inner
    shape = (-1, 1, 1) if node.op == "Conv" else (-1,)
    b.op("Add", [inner, correction.astype(np.float32).reshape(shape)], np.float32, outputs=[output])


def takes_output_bias(graph: gs.Graph, node: gs.Node, channels: int) -> bool:
    """Whether ``add_output_bias`` changes a constant the GEMM already has (no op added at run time)."""
    if node.op == "Conv" or (node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 1.0):
        return len(node.inputs) == 2 or constant_value(node.inputs[2]) is not None
    return _bias_add(graph, node, channels) is not None


def _bias_add(graph: gs.Graph, node: gs.Node, channels: int) -> tuple[gs.Node, int] | None:
    """(the Add after ``node`` that holds its constant bias of ``channels`` values, that input's index)."""
    output = node.outputs[0]
    readers = output.outputs
    if len(readers) != 1 or readers[0].op != "Add" or output in graph.outputs:
        return None
    add = readers[0]
    other = 1 if add.inputs[0] is output else 0
    bias = constant_value(add.inputs[other])
    if bias is None or bias.shape[-1:] != (channels,) or bias.size != channels:
        return None
    return add, other


def scale_rows(b: Builder, node: gs.Node, affine: GroupAffine, tokens: int) -> None:
    """After the GEMM: Y = r_t·Y_int + δ_t·colsum(Ŵ), the row form of the affine (token groups)."""
    column_sums = _float_weight(node).sum(axis=0)
    output = node.outputs[0]
    inner = gs.Variable(b.ctx.names.make(output.name, b.pass_name, "per_tensor"), dtype=np.float32)
    node.outputs[node.outputs.index(output)] = inner
    rows = b.op("Mul", [inner, affine.ratio.astype(np.float32).reshape(tokens, 1)], np.float32)
    # Two small constants whose product ORT folds once at load: the file keeps T + N values, not T·N.
    correction = b.op("Mul", [affine.shift.astype(np.float32).reshape(tokens, 1),
                              column_sums.astype(np.float32).reshape(1, -1)], np.float32)
    b.op("Add", [rows, correction], np.float32, outputs=[output])
