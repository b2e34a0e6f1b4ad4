"""How much the next layers weigh each output channel of a GEMM: the sensitivity LES can weight its loss by.

For a Linear/Conv output Y (C channels) the walk follows Y forward through channel-preserving ops
(elementwise, normalizations, Reshape/Transpose/Resize, channel-axis Concat with its offset) to the
next Linear/Conv readers G and sums, per channel c,

    v_c = Σ_G ‖W_G[:, c]‖² · Π (per-channel constant factors a_c on the path)²

(‖W_G[:, c]‖²: the energy of G's weights on input channel c, over outputs and the kernel). v/mean(v) is
what an error in channel c costs downstream relative to the others, to first order, when the
normalizations between (GroupNorm's 1/σ per group) treat the channels alike (not modelled).
None when any path ends somewhere else (the model output, an attention score MatMul, a Slice, an
unknown op): the channel weighting is then unknown, and the caller keeps the unweighted loss.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graph import constant_value
from qcompiler.patterns import Conv, Linear, match_conv, match_linear, weight_array

#: Ops that keep channel c of their (first) activation input in channel c of their output.
PASS_THROUGH = frozenset({
    "Add", "Sub", "Mul", "Div", "Sigmoid", "Relu", "Gelu", "Erf", "Tanh", "Softplus", "Identity", "Cast",
    "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Resize", "InstanceNormalization",
    "LayerNormalization", "GroupNormalization", "Dropout", "Clip", "LeakyRelu", "HardSigmoid", "Neg",
})
_IGNORED = frozenset({"Shape", "Size"})
_MAX_NODES = 400


def output_channel_weights(graph: gs.Graph, unit: Linear | Conv) -> np.ndarray | None:
    """v/mean(v) per output channel of ``unit`` (see the module docstring), or None where unknown."""
    channels = weight_array(unit).shape[unit.weight_out_axis]
    total = np.zeros(channels)
    outputs = {t.name for t in graph.outputs}
    stack = [(unit.output, 0, np.ones(channels))]
    seen, visits = set(), 0
    while stack:
        tensor, offset, factor = stack.pop()
        if tensor.name in outputs:
            return None
        for node in tensor.outputs:
            visits += 1
            if visits > _MAX_NODES:
                return None
            key = (node.name, offset)  # a node reached twice (x·σ(x)) counts once
            if node.op in _IGNORED or key in seen:
                continue
            seen.add(key)
            reader = _gemm_reading(node, tensor)
            if reader is not None:
                energy = _input_energy(reader)
                if energy is None or offset + channels > len(energy):
                    return None
                total += energy[offset:offset + channels] * factor ** 2
                continue
            step = _step(node, tensor, offset, channels)
            if step is None:
                return None
            next_offset, scale = step
            stack.extend((out, next_offset, factor * scale) for out in node.outputs)
    if not np.any(total > 0):
        return None
    return total / total.mean()


def _gemm_reading(node: gs.Node, tensor: gs.Tensor) -> Linear | Conv | None:
    """The Linear/Conv whose activation input is ``tensor`` (a constant weight; group-1 Convs only)."""
    if node.op in ("MatMul", "Gemm"):
        unit = match_linear(node)
    elif node.op == "Conv" and node.attrs.get("group", 1) == 1:
        unit = match_conv(node)
    else:
        return None
    return unit if unit and unit.input is tensor else None


def _input_energy(unit: Linear | Conv) -> np.ndarray | None:
    """Σ over outputs (and the kernel) of W² per input channel."""
    from qcompiler.lowering.channel_affine import weight_channel_energy

    return weight_channel_energy(weight_array(unit), unit.weight_in_axis)


def _step(node: gs.Node, tensor: gs.Tensor, offset: int, channels: int) -> tuple[int, np.ndarray] | None:
    """(offset of our channels in the node's output, per-channel factor a_c) or None: not channel-preserving."""
    if node.op == "Concat":
        return _concat_offset(node, tensor, offset)
    if node.op not in PASS_THROUGH:
        return None
    ones = np.ones(channels)
    if node.op == "LayerNormalization" and len(node.inputs) > 1 and node.inputs[0] is tensor:
        return offset, _per_channel(constant_value(node.inputs[1]), offset, channels)
    if node.op in ("Mul", "Div") and len(node.inputs) == 2:
        if node.op == "Div" and node.inputs[1] is tensor:
            return None  # c / X: not linear in X
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        value = _per_channel(constant_value(other), offset, channels)
        return offset, (1.0 / np.where(value == 0, np.inf, value) if node.op == "Div" else value)
    return offset, ones


def _per_channel(value, offset: int, channels: int) -> np.ndarray:
    """A constant operand as the factor of our channels: a scalar, or a vector over the channel axis."""
    if value is None:
        return np.ones(channels)  # an activation operand (SiLU's x·σ(x)): no constant factor
    value = np.asarray(value, np.float64).reshape(-1)
    if value.size == 1:
        return np.full(channels, value[0])
    if value.size >= offset + channels:
        return value[offset:offset + channels]
    return np.ones(channels)


def _concat_offset(node: gs.Node, tensor: gs.Tensor, offset: int) -> tuple[int, np.ndarray] | None:
    """Our channels' offset in a Concat along the channel axis (axis 1 of 4-D, the last axis otherwise)."""
    shapes = [getattr(t, "shape", None) for t in node.inputs]
    if any(s is None for s in shapes):
        return None
    rank = len(shapes[0])
    axis = node.attrs.get("axis", 0) % rank
    if axis != (1 if rank == 4 else rank - 1):
        return None
    start = 0
    for t, shape in zip(node.inputs, shapes):
        if t is tensor:
            return start + offset, np.ones(1)
        if not isinstance(shape[axis], int):
            return None
        start += shape[axis]
    return None
