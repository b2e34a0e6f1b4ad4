"""Recognise the units passes speak of — Linear, Conv, Attention, Norm, SkipConcat — in a gs.Graph.

Each ``match_*`` returns the unit or a ``NoMatch`` whose ``reason`` says why not (e.g. "the
weight of MatMul 'fc' is not constant"), so a pass can report what it skipped and why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graph import constant_value


@dataclass(frozen=True)
class NoMatch:
    reason: str

    def __bool__(self) -> bool:
        return False


def _single_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if len(tensor.outputs) == 1 and tensor.outputs[0].op == op:
        return tensor.outputs[0]
    return None


def _producer(tensor: gs.Tensor, ops: tuple[str, ...]) -> gs.Node | None:
    if len(tensor.inputs) == 1 and tensor.inputs[0].op in ops:
        return tensor.inputs[0]
    return None


@dataclass(eq=False)
class Linear:
    """Y = X·W (+ b): a MatMul with a constant 2-D weight [K, N], or a Gemm (weight [N, K] if transB)."""

    node: gs.Node
    weight: gs.Tensor
    bias_node: gs.Node | None
    bias: gs.Tensor | None

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.bias_node.outputs[0] if self.bias_node is not None else self.node.outputs[0]

    @property
    def weight_out_axis(self) -> int:
        """The weight axis of output channels: 1 for MatMul [K, N], 0 for Gemm with transB."""
        if self.node.op == "Gemm" and self.node.attrs.get("transB", 0):
            return 0
        return 1

    @property
    def weight_in_axis(self) -> int:
        return 1 - self.weight_out_axis


def match_linear(node: gs.Node) -> Linear | NoMatch:
    if node.op not in ("MatMul", "Gemm"):
        return NoMatch(f"'{node.name}' is {node.op}, not MatMul/Gemm")
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return NoMatch(f"Gemm '{node.name}' has transA=1")
    weight = node.inputs[1]
    value = constant_value(weight)
    if value is None:
        return NoMatch(f"the weight of {node.op} '{node.name}' is not constant")
    if value.ndim != 2:
        return NoMatch(f"the weight of {node.op} '{node.name}' is {value.ndim}-D, not 2-D")
    if node.op == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return Linear(node, weight, None, bias)
    add = _single_consumer(node.outputs[0], "Add")
    if add is not None:
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        bias_value = constant_value(other)
        out_features = value.shape[1]
        if bias_value is not None and bias_value.size == out_features and bias_value.shape[-1] == out_features:
            return Linear(node, weight, add, other)
    return Linear(node, weight, None, None)


@dataclass(eq=False)
class Conv:
    """Y = Conv(X, W[O, I/groups, kh, kw]) (+ b)."""

    node: gs.Node
    weight: gs.Tensor
    bias: gs.Tensor | None

    @property
    def input(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    weight_out_axis = 0
    weight_in_axis = 1


def match_conv(node: gs.Node) -> Conv | NoMatch:
    if node.op != "Conv":
        return NoMatch(f"'{node.name}' is {node.op}, not Conv")
    if constant_value(node.inputs[1]) is None:
        return NoMatch(f"the weight of Conv '{node.name}' is not constant")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return Conv(node, node.inputs[1], bias)


@dataclass(eq=False)
class Attention:
    """softmax(Q·Kᵀ·scale [+ mask]) · V: the score MatMul, Softmax and the value MatMul."""

    score_matmul: gs.Node
    softmax: gs.Node
    value_matmul: gs.Node
    kind: str  # "self" | "cross"

    @property
    def probabilities(self) -> gs.Tensor:
        return self.softmax.outputs[0]


_PASS_THROUGH = ("Reshape", "Transpose", "Mul", "Div", "Add", "Cast", "Squeeze", "Unsqueeze",
                 "QuantizeLinear", "DequantizeLinear", "Clip")


def _is_projection(node: gs.Node) -> bool:
    """A Linear, before or after quantize_weights (constant, DequantizeLinear-fed, or MatMulNBits weight)."""
    if node.op == "MatMulNBits":
        return True
    if node.op not in ("MatMul", "Gemm"):
        return False
    weight = node.inputs[1]
    return constant_value(weight) is not None or bool(weight.inputs and weight.inputs[0].op == "DequantizeLinear"
                                                        and constant_value(weight.inputs[0].inputs[0]) is not None)


def _source(tensor: gs.Tensor, depth: int = 8) -> gs.Tensor:
    """Walk back through reshapes/transposes/projections to the tensor a Q/K/V projection reads."""
    for _ in range(depth):
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return tensor
        if _is_projection(producer):
            return producer.inputs[0]
        if producer.op not in _PASS_THROUGH:
            return tensor
        variables = [t for t in producer.inputs if constant_value(t) is None]
        if not variables:
            return tensor
        tensor = variables[0]
    return tensor


def match_attention(softmax: gs.Node) -> Attention | NoMatch:
    if softmax.op != "Softmax":
        return NoMatch(f"'{softmax.name}' is {softmax.op}, not Softmax")
    node = softmax.inputs[0].inputs[0] if softmax.inputs[0].inputs else None
    while node is not None and node.op in ("Mul", "Div", "Add", "Where", "Cast"):
        node = next((t.inputs[0] for t in node.inputs if t.inputs and constant_value(t) is None), None)
    if node is None or node.op != "MatMul":
        return NoMatch(f"Softmax '{softmax.name}' is not fed by a score MatMul")
    consumers = softmax.outputs[0].outputs
    value_matmul = next((c for c in consumers if c.op == "MatMul" and c.inputs[0] is softmax.outputs[0]), None)
    if value_matmul is None:
        return NoMatch(f"Softmax '{softmax.name}' does not feed a MatMul with V")
    query_source, key_source = _source(node.inputs[0]), _source(node.inputs[1])
    kind = "self" if query_source is key_source else "cross"
    return Attention(node, softmax, value_matmul, kind)


@dataclass(eq=False)
class Norm:
    """A normalisation with an affine output y = n(x)·γ + β, in one of three exported forms."""

    kind: str  # "LayerNormalization" | "GroupNormalization" | "InstanceNormalization"
    nodes: tuple[gs.Node, ...]
    gamma: gs.Tensor
    beta: gs.Tensor | None

    @property
    def output(self) -> gs.Tensor:
        return self.nodes[-1].outputs[0]


def match_norm(node: gs.Node) -> Norm | NoMatch:
    if node.op in ("LayerNormalization", "GroupNormalization"):
        if constant_value(node.inputs[1]) is None:
            return NoMatch(f"the scale of {node.op} '{node.name}' is not constant")
        beta = node.inputs[2] if len(node.inputs) > 2 else None
        return Norm(node.op, (node,), node.inputs[1], beta)
    if node.op != "InstanceNormalization":
        return NoMatch(f"'{node.name}' is {node.op}, not a normalisation")
    # Exporters emit GroupNorm as Reshape -> InstanceNorm(γ=1, β=0) -> Reshape -> Mul(γ) -> Add(β).
    reshape = _single_consumer(node.outputs[0], "Reshape")
    mul = _single_consumer(reshape.outputs[0], "Mul") if reshape is not None else None
    if mul is None:
        return NoMatch(f"InstanceNormalization '{node.name}' is not followed by Reshape -> Mul (affine)")
    gamma = next((t for t in mul.inputs if constant_value(t) is not None), None)
    if gamma is None:
        return NoMatch(f"the affine Mul after '{node.name}' has no constant γ")
    add = _single_consumer(mul.outputs[0], "Add")
    beta = next((t for t in add.inputs if constant_value(t) is not None), None) if add is not None else None
    nodes = (node, reshape, mul) + ((add,) if beta is not None else ())
    return Norm("InstanceNormalization", nodes, gamma, beta)


@dataclass(eq=False)
class SkipConcat:
    """A Concat (UNet decoder: concat(h, skip)) whose output feeds Conv/Linear consumers directly."""

    concat: gs.Node
    consumers: tuple[gs.Node, ...]


def match_skip_concat(node: gs.Node) -> SkipConcat | NoMatch:
    if node.op != "Concat":
        return NoMatch(f"'{node.name}' is {node.op}, not Concat")
    variables = [t for t in node.inputs if constant_value(t) is None]
    if len(variables) < 2:
        return NoMatch(f"Concat '{node.name}' joins fewer than two activations")
    consumers = tuple(c for c in node.outputs[0].outputs if match_conv(c) or match_linear(c))
    if not consumers:
        return NoMatch(f"Concat '{node.name}' feeds no Conv/Linear")
    return SkipConcat(node, consumers)


def _find(graph: gs.Graph, matcher) -> list:
    return [unit for unit in (matcher(node) for node in graph.nodes) if unit]


def find_linears(graph: gs.Graph) -> list[Linear]:
    return _find(graph, match_linear)


def find_convs(graph: gs.Graph) -> list[Conv]:
    return _find(graph, match_conv)


def find_attention(graph: gs.Graph) -> list[Attention]:
    return _find(graph, match_attention)


def find_norms(graph: gs.Graph) -> list[Norm]:
    return _find(graph, match_norm)


def find_skip_concats(graph: gs.Graph) -> list[SkipConcat]:
    return _find(graph, match_skip_concat)


def weight_array(unit: Linear | Conv) -> np.ndarray:
    return constant_value(unit.weight)
