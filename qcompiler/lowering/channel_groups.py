"""Graph pieces that lower DGQ channel groups: K-split integer GEMMs/Convs and the fold into W.

Channel groups split the GEMM's reduction axis, so one integer GEMM cannot carry K activation
scales. Reordering the channels by group (offline on the weight rows, one Gather on X) makes
each group a contiguous slice, and

    Y = Σ_k s_k · s_w[n] · Σ_{j ∈ G_k} (q_j − z_k) · W_q[j, n]                  (K-split, exact)

is K integer GEMMs with scalar activation parameters (DQ → MatMul, which ORT fuses into
MatMulIntegerToFloat; ConvInteger for Conv), summed in float. The fold variant keeps one GEMM:
every channel j of group g is quantized with a common zero point z and its group's scale σ_g,
dequantized with one scale s_ref = max_g σ_g, and the ratio ρ_j = σ_g/s_ref moves into W:

    Y ≈ Σ_j s_ref·(q_j − z) · Ŵ'[j, n],   Ŵ' = requantize(Ŵ·diag(ρ))                (fold, approximate)

σ_g ≥ s_g is the smallest scale that holds group g's range around the shared z (z minimises
max_g σ_g/s_g). Its error exceeds the split's by the coarser σ_g and by re-rounding Ŵ·ρ: the
weights were quantized before the fold, so each entry gains up to s'_w/2 (s'_w: the new column scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.graph import constant_value
from qcompiler.grids import GroupPlan
from qcompiler.quant import QuantSpec, quantize_weight, shared_zero_point


class Builder:
    """Adds nodes named ``<base>/<pass>/<Op>`` whose doc_string says which pass made them and why."""

    def __init__(self, ctx: CompileContext, pass_name: str, base: str, why: str):
        self.ctx, self.pass_name, self.base, self.why = ctx, pass_name, base, why

    def const(self, suffix: str, value) -> gs.Constant:
        return self.ctx.constant(self.ctx.names.make(self.base, self.pass_name, suffix), np.asarray(value))

    def op(self, op: str, inputs: list, dtype, attrs: dict | None = None, outputs: list | None = None,
           count: int = 1, domain: str | None = None):
        """Append ``op``; numpy inputs become constants. Returns its output (or ``count`` outputs)."""
        names = self.ctx.names
        inputs = [self.const(f"{op}_input{i}", x) if isinstance(x, (np.ndarray, np.generic)) else x
                  for i, x in enumerate(inputs)]
        if outputs is None:
            outputs = [gs.Variable(names.make(self.base, self.pass_name, f"{op}_output"), dtype=dtype)
                       for _ in range(count)]
        node = gs.Node(op, names.make(self.base, self.pass_name, op), attrs=attrs or {}, inputs=inputs,
                       outputs=outputs)
        node.doc_string = f"qcompile {self.pass_name}: {self.why}"
        if domain:
            node.domain = domain
        self.ctx.graph.nodes.append(node)
        return outputs if count > 1 else outputs[0]

    def narrow(self, quantized: gs.Tensor, spec: QuantSpec) -> gs.Tensor:
        """Below 8 bits clamp the uint8 codes to [qmin, qmax]: clamp(clamp(v, 0, 255), a, b) = clamp(v, a, b)."""
        if spec.bits >= 8:
            return quantized
        return self.op("Clip", [quantized, np.array(spec.qmin, np.uint8), np.array(spec.qmax, np.uint8)], np.uint8)

    def cast_float(self, tensor: gs.Tensor) -> gs.Variable:
        return self.op("Cast", [tensor], np.float32, attrs={"to": onnx.TensorProto.FLOAT})


@dataclass(frozen=True)
class LinearWeight:
    """A quantized Linear as one GEMM: Y = X·(W_q·diag(scale)) [+ bias], W_q of shape [C, N]."""

    values: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None = None  # a Gemm's β·C; a MatMul's bias Add stays in the graph


def weight_dq(node: gs.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(W_q, scale, axis) of the DequantizeLinear that feeds ``node``'s weight, when its zero point is 0."""
    producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if producer is None or producer.op != "DequantizeLinear":
        return None
    values = [constant_value(t) for t in producer.inputs]
    if any(v is None for v in values) or (len(values) > 2 and np.any(values[2] != 0)):
        return None
    axis = int(producer.attrs.get("axis", 1)) % values[0].ndim
    # A per-tensor weight scale becomes a per-channel vector, so every lowering sees one shape.
    scale = np.broadcast_to(np.asarray(values[1], np.float32), (values[0].shape[axis],)).copy()
    return values[0], scale, axis


def dequantized_weight(node: gs.Node) -> np.ndarray:
    """Ŵ = (W_q − z_w)·s_w as float: what the weight DequantizeLinear computes, as a constant."""
    producer = node.inputs[1].inputs[0]
    values, scale, *zero_point = (constant_value(t) for t in producer.inputs)
    shape = [1] * values.ndim
    if np.ndim(scale) == 1:
        shape[int(producer.attrs.get("axis", 1)) % values.ndim] = scale.size
    offset = zero_point[0].astype(np.float32).reshape(shape) if zero_point else np.float32(0.0)
    return ((values.astype(np.float32) - offset) * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def linear_weight(node: gs.Node) -> LinearWeight | str:
    """The [C, N] integer weight of a MatMul/Gemm (Gemm's α folded into the scale), or why not."""
    found = weight_dq(node)
    if found is None:
        return f"the weight of {node.op} '{node.name}' is not a constant DequantizeLinear with zero point 0"
    values, scale, axis = found
    if node.op == "MatMul":
        return LinearWeight(values, scale) if axis == 1 else f"MatMul '{node.name}' has its weight scale on axis {axis}"
    if node.attrs.get("transA", 0):
        return f"Gemm '{node.name}' has transA=1"
    if node.attrs.get("transB", 0):
        values = values.T
    bias = None
    if len(node.inputs) > 2:
        bias = constant_value(node.inputs[2])
        if bias is None:
            return f"the bias of Gemm '{node.name}' is not constant"
        bias = (float(node.attrs.get("beta", 1.0)) * bias).astype(np.float32)
    return LinearWeight(values, (scale * float(node.attrs.get("alpha", 1.0))).astype(np.float32), bias)


@dataclass
class ChannelParts:
    """X reordered by group (``order``) and split into K slices, each quantized with (s_k, z_k)."""

    order: np.ndarray
    sizes: np.ndarray
    quantized: list[gs.Tensor]
    dequantized: list[gs.Tensor] | None = None

    def slices(self) -> list[np.ndarray]:
        """The original channel indices of each group, in the order the slices hold them."""
        return np.split(self.order, np.cumsum(self.sizes)[:-1])


def group_slices(plan: GroupPlan) -> list[np.ndarray]:
    """The channel indices of each group (int64, in label order): the slices ``split_by_group`` makes."""
    order = np.argsort(plan.labels, kind="stable").astype(np.int64)
    return np.split(order, np.cumsum(np.bincount(plan.labels, minlength=plan.groups))[:-1])


def split_by_group(b: Builder, plan: GroupPlan, x: gs.Tensor, axis: int) -> list[gs.Tensor]:
    """Gather(X, order) → Split(sizes) along ``axis``: one tensor per group, channels in ``group_slices`` order."""
    slices = group_slices(plan)
    order = np.concatenate(slices)
    source = x
    if not np.array_equal(order, np.arange(order.size)):
        source = b.op("Gather", [x, order], np.float32, attrs={"axis": axis})
    if plan.groups == 1:
        return [source]
    sizes = np.array([len(part) for part in slices], np.int64)
    if b.ctx.graph.opset >= 13:
        return b.op("Split", [source, sizes], np.float32, attrs={"axis": axis}, count=plan.groups)
    return b.op("Split", [source], np.float32, attrs={"axis": axis, "split": sizes.tolist()}, count=plan.groups)


def quantize_channel_groups(b: Builder, plan: GroupPlan, x: gs.Tensor) -> ChannelParts:
    """Gather(X, order) → Split(sizes) → QuantizeLinear(s_k, z_k) per group (uint8 codes)."""
    slices = group_slices(plan)
    parts = split_by_group(b, plan, x, plan.channel_axis)
    spec = plan.spec
    quantized = [b.narrow(b.op("QuantizeLinear", [part, plan.scales[k], plan.zero_points[k]], np.uint8), spec)
                 for k, part in enumerate(parts)]
    return ChannelParts(np.concatenate(slices), np.array([len(part) for part in slices], np.int64), quantized)


def dequantize_parts(b: Builder, plan: GroupPlan, parts: ChannelParts) -> list[gs.Tensor]:
    """One DequantizeLinear per group slice (scalar parameters: ORT fuses DQ → MatMul)."""
    if parts.dequantized is None:
        parts.dequantized = [b.op("DequantizeLinear", [q, plan.scales[k], plan.zero_points[k]], np.float32)
                             for k, q in enumerate(parts.quantized)]
    return parts.dequantized


def _finish(b: Builder, partials: list[gs.Tensor], bias: np.ndarray | None, output: gs.Tensor) -> None:
    """Sum the partial results and the bias into ``output`` with one Sum node.

    Sum, not Add: ORT fuses a 2-D MatMul followed by Add into a float Gemm before its QDQ fusion
    runs, and that Gemm would never become an integer kernel."""
    inputs = partials + ([bias] if bias is not None else [])
    b.op("Sum" if len(inputs) > 1 else "Identity", inputs, np.float32, outputs=[output])


def lower_linear_split(b: Builder, node: gs.Node, weight: LinearWeight, plan: GroupPlan,
                       parts: ChannelParts) -> None:
    """Y = Σ_k MatMul(DQ(q_k; s_k, z_k), DQ(W_q[G_k, :]; s_w)) [+ bias]: K MatMulIntegerToFloat kernels."""
    output = node.outputs[0]
    node.outputs.clear()
    scale = b.const("weight_scale", weight.scale)  # one constant shared by the K weight slices
    zeros = b.const("weight_zero_point", np.zeros(weight.scale.size, np.int8))
    partials = []
    for rows, dequantized in zip(parts.slices(), dequantize_parts(b, plan, parts)):
        w_k = b.op("DequantizeLinear", [weight.values[rows], scale, zeros], np.float32, attrs={"axis": 1})
        partials.append(b.op("MatMul", [dequantized, w_k], np.float32))
    _finish(b, partials, weight.bias, output)


def conv_split_reason(node: gs.Node) -> str | None:
    """Why a Conv cannot take the ConvInteger split, or None when it can."""
    if weight_dq(node) is None or weight_dq(node)[2] != 0:
        return f"the weight of Conv '{node.name}' is not a per-output-channel DequantizeLinear with zero point 0"
    if int(node.attrs.get("group", 1)) != 1:
        return f"Conv '{node.name}' is grouped (group={node.attrs['group']}): its channel slices are not GEMM slices"
    if len(node.inputs) > 2 and constant_value(node.inputs[2]) is None:
        return f"the bias of Conv '{node.name}' is not constant"
    return None


def lower_conv_split(b: Builder, node: gs.Node, plan: GroupPlan, parts: ChannelParts) -> None:
    """Y = Σ_k s_k·s_w[o]·ConvInteger(q_k, W_q[:, G_k], z_k) + b: K integer Convs (padding reads z_k = 0.0)."""
    values, scale, _ = weight_dq(node)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    broadcast = (1, values.shape[0]) + (1,) * (values.ndim - 2)
    attrs = {k: v for k, v in node.attrs.items() if k in ("auto_pad", "dilations", "kernel_shape", "pads", "strides")}
    output = node.outputs[0]
    node.outputs.clear()
    partials = []
    for k, (channels, quantized) in enumerate(zip(parts.slices(), parts.quantized)):
        integer = b.op("ConvInteger", [quantized, values[:, channels], plan.zero_points[k]], np.int32, attrs=attrs)
        rescale = (plan.scales[k] * scale).astype(np.float32).reshape(broadcast)
        partials.append(b.op("Mul", [b.cast_float(integer), rescale], np.float32))
    _finish(b, partials, None if bias is None else bias.astype(np.float32).reshape(broadcast), output)


def fold_parameters(plan: GroupPlan) -> tuple[np.ndarray, int]:
    """(σ_g, z): one zero point for all groups and the smallest per-group scales that hold each range
    (``quant.shared_zero_point``, z minimising the worst loss of resolution against s_g)."""
    return shared_zero_point(plan.group_min, plan.group_max, plan.spec, plan.scales)


def fold_activation(b: Builder, plan: GroupPlan) -> tuple[gs.Tensor, np.ndarray]:
    """Div(X, σ_g(j)) → Q(1, z) → DQ(s_ref, z): one per-tensor DQ. Returns it and ρ_j = σ_g(j)/s_ref.

    Q(X/σ, 1, z) = clamp(round(X/σ) + z) is Q(X, σ, z) per channel, bit for bit; the Div is there
    because ORT's per-axis QuantizeLinear on the innermost axis runs element by element: 6–9 ms
    against 0.14 ms for the Div and a per-tensor Q on an (8, 128, 384) tensor, one thread, here."""
    sigma, zero_point = fold_parameters(plan)
    reference = np.float32(sigma.max())
    x = b.ctx.graph.tensors()[plan.tensor]
    shape = [1] * (len(x.shape) if x.shape else 1)
    shape[plan.channel_axis] = plan.labels.size
    scaled = b.op("Div", [x, sigma[plan.labels].reshape(shape)], np.float32)
    quantized = b.op("QuantizeLinear", [scaled, np.array(1.0, np.float32), np.array(zero_point, np.uint8)], np.uint8)
    dequantized = b.op("DequantizeLinear", [b.narrow(quantized, plan.spec), np.array(reference),
                                            np.array(zero_point, np.uint8)], np.float32)
    return dequantized, (sigma[plan.labels] / reference).astype(np.float32)


def lower_linear_fold(b: Builder, node: gs.Node, weight: LinearWeight, dequantized: gs.Tensor, rho: np.ndarray,
                      wbits: int) -> None:
    """MatMul(DQ(X'), DQ(requantize(Ŵ·diag(ρ)))) [+ bias]: one MatMulIntegerToFloat."""
    folded = (weight.values.astype(np.float32) * weight.scale) * rho[:, None]
    spec = QuantSpec(bits=wbits, symmetric=True, granularity="axis", axis=1)
    values, scale, zero_point = quantize_weight(folded, spec)
    output = node.outputs[0]
    node.outputs.clear()
    w_dq = b.op("DequantizeLinear", [values, scale, zero_point], np.float32, attrs={"axis": 1})
    _finish(b, [b.op("MatMul", [dequantized, w_dq], np.float32)], weight.bias, output)


def affine_reason(node: gs.Node, rank2_matmul_weight: bool = False) -> str | None:
    """Why GEMM ``node`` cannot take DGQ's exact per-channel affine around one integer grid, or None.

    The weight must be a constant DequantizeLinear with zero point 0 and its scale on the output
    axis; Convs must be splittable without padding surprises; ``rank2_matmul_weight`` (TensorRT)
    also refuses batched MatMul weights."""
    if node.op == "MatMulNBits":
        return None
    if node.op == "Conv":
        reason = conv_split_reason(node)
        if reason is None and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            reason = f"Conv '{node.name}' uses auto_pad={node.attrs['auto_pad']}"
        return reason
    found = weight_dq(node)
    if found is None:
        return f"the weight of {node.op} '{node.name}' is not a constant DequantizeLinear with zero point 0"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or float(node.attrs.get("beta", 1.0)) not in (0.0, 1.0)):
        return f"Gemm '{node.name}' has transA=1 or β ∉ {{0, 1}}"
    expected = 1 if node.op == "MatMul" else (0 if node.attrs.get("transB", 0) else 1)
    if rank2_matmul_weight and node.op == "MatMul" and found[0].ndim != 2:
        return f"MatMul '{node.name}' has a rank-{found[0].ndim} weight"
    return None if found[2] == expected else f"{node.op} '{node.name}' has its weight scale on axis {found[2]}"
