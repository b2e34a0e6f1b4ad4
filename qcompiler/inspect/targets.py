"""Choose what `qcompile inspect` watches: GEMM inputs, norm outputs, residual sums, weights, attention.

Activations of interest (docs/algorithms.md §5.7, after "Systematic Outliers in LLMs"):
- the input of every Linear/Conv (what a recipe quantizes),
- every normalisation output (LayerNorm/GroupNorm: the layer outputs of a post-LN transformer),
- every residual sum: an Add of two activations that does not broadcast, i.e. not a bias Add
  (one constant input), not the attention-mask Add (feeds a Softmax, broadcasts over heads)
  and not GELU's ``1 + erf`` (a Constant-node input).
Channel axis: last for Linear/LayerNorm tensors (B, T, C), 1 for Conv/GroupNorm tensors
(B, C, H, W); positions are the remaining axes flattened (tokens, or pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graph import constant_value
from qcompiler.patterns import Conv, Linear, find_attention, find_convs, find_linears, find_norms

#: Channel axis by the op that reads (or writes) a tensor: NCHW ops use 1, the rest the last axis.
_CHANNEL_FIRST_OPS = frozenset({"Conv", "GroupNormalization", "InstanceNormalization", "BatchNormalization"})


@dataclass(frozen=True)
class Activation:
    """One watched activation tensor; ``label`` is a short display name, ``tensor`` the graph name."""

    tensor: str
    label: str
    channel_axis: int
    roles: tuple[str, ...]
    consumers: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Layer:
    """A Linear or Conv whose weight is constant, with the weight viewed as ``[out, in, kernel]``."""

    node: str
    label: str
    op: str
    input: str
    weight_name: str
    weight: np.ndarray
    groups: int

    @property
    def column_absmax(self) -> np.ndarray:
        """max over outputs and kernel taps of |W| per input channel: SmoothQuant's max_i|W_ji|."""
        return np.abs(self.weight).max(axis=(0, 2))


@dataclass(frozen=True)
class AttentionSite:
    """The Softmax output of one attention block: ``(batch, heads, queries, keys)`` or without heads."""

    tensor: str
    label: str
    kind: str  # "self" | "cross"


@dataclass(frozen=True)
class Targets:
    activations: tuple[Activation, ...]
    layers: tuple[Layer, ...]
    attention: tuple[AttentionSite, ...]

    def tensors(self) -> list[str]:
        """Every tensor both passes run, activations first, in one fixed order (equal chunks per pass)."""
        return [a.tensor for a in self.activations] + [a.tensor for a in self.attention]


def _weight_out_in_kernel(unit: Linear | Conv) -> np.ndarray:
    """The weight as ``[out, in, kernel taps]``: MatMul [K, N] is transposed, Conv taps flattened."""
    value = np.asarray(constant_value(unit.weight))
    if isinstance(unit, Linear):
        matrix = value if unit.weight_out_axis == 0 else value.T
        return matrix[:, :, None]
    return value.reshape(value.shape[0], value.shape[1], -1)


def _broadcasts(left: gs.Tensor, right: gs.Tensor) -> bool:
    """True when the shapes are known to differ (rank, or a static size that is not on both sides)."""
    if left.shape is None or right.shape is None:
        return False
    if len(left.shape) != len(right.shape):
        return True
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(left.shape, right.shape))


def _is_residual_sum(node: gs.Node) -> bool:
    if node.op != "Add" or len(node.inputs) != 2:
        return False
    if any(constant_value(tensor) is not None for tensor in node.inputs):
        return False
    if any(consumer.op == "Softmax" for consumer in node.outputs[0].outputs):
        return False  # the attention-mask Add on the scores
    return not _broadcasts(*node.inputs)


def _axis_from_ops(ops: list[str], rank: int | None) -> int:
    if any(op in _CHANNEL_FIRST_OPS for op in ops):
        return 1
    if ops or rank is None or rank != 4:
        return -1
    return 1  # an NCHW sum that feeds none of the ops above: channels are still axis 1


def _labeller(names: list[str]):
    """Short names: the producing node's path without the prefix every name shares or a repeated op name."""
    parts = [name.strip("/").split("/") for name in names]
    common = os.path.commonprefix(parts) if len(parts) > 1 else []
    depth = min(len(common), min(len(p) for p in parts) - 1) if parts else 0

    def label(name: str) -> str:
        kept = name.strip("/").split("/")[depth:]
        if len(kept) > 1 and kept[-1].startswith(kept[-2]):  # ".../LayerNorm/LayerNormalization"
            kept = kept[:-1]
        return "/".join(kept) or name
    return label


def find_targets(graph: gs.Graph) -> Targets:
    """Everything inspect watches, in graph order; see the module docstring for the selection."""
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    units = sorted(find_linears(graph) + find_convs(graph), key=lambda unit: order[unit.node.name])
    norms = find_norms(graph)
    sums = [node for node in graph.nodes if _is_residual_sum(node)]

    roles: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = {}
    producers: dict[str, gs.Node | None] = {}
    for unit in units:
        if constant_value(unit.input) is not None:
            continue  # a constant × constant GEMM: nothing to calibrate
        name = unit.input.name
        roles.setdefault(name, []).append("gemm_input")
        consumers.setdefault(name, []).append(unit.node.name)
        producers[name] = unit.input.inputs[0] if unit.input.inputs else None
    for norm in norms:
        roles.setdefault(norm.output.name, []).append("norm_output")
        producers[norm.output.name] = norm.nodes[-1]
    for node in sums:
        roles.setdefault(node.outputs[0].name, []).append("residual_sum")
        producers[node.outputs[0].name] = node

    tensors = graph.tensors()
    position = {name: order[p.name] if p is not None else -1 for name, p in producers.items()}
    names = sorted(roles, key=lambda name: position[name])
    label = _labeller([producers[n].name for n in names if producers[n] is not None]
                      + [unit.node.name for unit in units])
    activations = []
    for name in names:
        tensor = tensors[name]
        producer = producers[name]
        ops = [c.op for c in tensor.outputs if c.op in _CHANNEL_FIRST_OPS | {"MatMul", "Gemm", "LayerNormalization"}]
        if producer is not None and producer.op in _CHANNEL_FIRST_OPS:
            ops.append(producer.op)
        rank = len(tensor.shape) if tensor.shape is not None else None
        activations.append(Activation(
            tensor=name, label=label(producer.name) if producer is not None else name,
            channel_axis=_axis_from_ops(ops, rank), roles=tuple(dict.fromkeys(roles[name])),
            consumers=tuple(consumers.get(name, ()))))
    layers = tuple(Layer(node=unit.node.name, label=label(unit.node.name), op=unit.node.op, input=unit.input.name,
                         weight_name=unit.weight.name, weight=_weight_out_in_kernel(unit),
                         groups=int(unit.node.attrs.get("group", 1)) if isinstance(unit, Conv) else 1)
                   for unit in units)
    attention = tuple(AttentionSite(site.probabilities.name, label(site.softmax.name), site.kind)
                      for site in find_attention(graph))
    return Targets(tuple(activations), layers, attention)
