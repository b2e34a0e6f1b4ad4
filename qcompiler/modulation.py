"""AdaLN modulation X = N·S + T in DiTs, and folding a per-channel X' = X/m + a into where S and T come from.

A DiT block modulates a normalised activation per sample: ``x·(1 + γ) + β`` with γ, β the
chunks of a modulation Linear on the conditioning vector (diffusers' ``DiTTransformer2DModel``:
a Linear per block, sliced six ways), or the chunks of a constant table plus a shared Linear
(``PixArtTransformer2DModel``: ``scale_shift_table + adaln_single(t)``). For X' = X/m + a:

    X/m + a = N·(S/m) + (T/m + a)

so S and T are rewritten, never N. A tensor V is rewritten to V/m + a by walking up its producers:
    Add(U, c), c constant:   c' = c/m + a, U → U/m          (the "1 +" of 1 + γ becomes 1/m)
    Mul(U, c) / Div(U, c):   c' = c/m / c' = c·m  (a = 0)
    Unsqueeze / Squeeze / Reshape / float Cast: m and a reshaped along
    Slice of U (constant or shape-computed bounds) on one axis: m, a placed in the slice's range of U
        (ones/zeros elsewhere), when every other reader of U is a Shape or a disjoint Slice
    Linear (MatMul/Gemm, constant weight) writing U: W[:, j]' = W[:, j]/m_j,  b' = b/m + a
Where a tensor has other readers or an op outside this list writes it (a shared Linear, SiLU, a
graph input), an explicit Mul(1/m) [and Add(a)] is inserted on that edge only. On this path the
tensors are per sample (B × 6·C at most), not per token, so such a Mul costs ~1/tokens of a
per-token one; it is still listed in ``ctx.fallbacks`` with its size.

Exact in real arithmetic (constants computed in float64, rounded once to float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.graph import constant_value
from qcompiler.patterns import NoMatch, match_linear, match_norm

_NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization")
#: Readers that see only a tensor's shape: a rescaled value does not change what they compute.
_SHAPE_ONLY = ("Shape", "Size")


@dataclass(eq=False)
class Modulation:
    """X = N·S + T (T optional): a Norm's output N scaled by S and shifted by T."""

    mul: gs.Node
    add: gs.Node | None
    normalized: gs.Tensor
    scale: gs.Tensor
    shift: gs.Tensor | None
    #: After ``fold_into_modulation``: the tensors whose values it changed (the S and T paths and X).
    changed: set[str] = field(default_factory=set)

    @property
    def node(self) -> gs.Node:
        return self.add if self.add is not None else self.mul

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _readers(tensor: gs.Tensor) -> list[gs.Node]:
    return [node for node in tensor.outputs if node.op not in _SHAPE_ONLY]


def _is_normalized(tensor: gs.Tensor) -> bool:
    node = _producer(tensor)
    if node is None:
        return False
    if node.op in ("LayerNormalization", "GroupNormalization"):
        return True
    for _ in range(3):  # InstanceNorm form: Add(β) ← Mul(γ) ← Reshape ← InstanceNormalization
        if node is None or node.op == "InstanceNormalization":
            break
        node = next((_producer(t) for t in node.inputs if _producer(t) is not None), None)
    norm = match_norm(node) if node is not None and node.op in _NORM_OPS else None
    return bool(norm) and norm.output is tensor


def _depends_on(tensor: gs.Tensor, source: gs.Tensor, depth: int = 8) -> bool:
    """Whether ``source`` is among the inputs of ``tensor``'s producers, ``depth`` levels up."""
    frontier = [tensor]
    for _ in range(depth):
        frontier = [t for f in frontier if f.inputs for t in f.inputs[0].inputs]
        if any(t is source for t in frontier):
            return True
    return False


def _split_product(mul: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(N, S) of a Mul whose one operand is a Norm's output and the other is not computed from it
    (N·Sigmoid(N), a SiLU after a norm, is no modulation)."""
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    for normalized, scale in (mul.inputs, reversed(mul.inputs)):
        if _is_normalized(normalized) and not _is_normalized(scale) and not _depends_on(scale, normalized):
            return normalized, scale
    return None


def match_modulation(tensor: gs.Tensor) -> Modulation | NoMatch:
    """The modulation writing ``tensor`` (X = N·S + T or X = N·S), or why it is not one."""
    node = _producer(tensor)
    if node is not None and node.op == "Mul" and _split_product(node):
        normalized, scale = _split_product(node)
        return Modulation(node, None, normalized, scale, None)
    if node is None or node.op != "Add" or len(node.inputs) != 2:
        return NoMatch(f"'{tensor.name}' is not written by Add(Mul(norm, scale), shift)")
    for index, product in enumerate(node.inputs):
        mul = _producer(product)
        if mul is not None and _split_product(mul):
            if [id(n) for n in _readers(product)] != [id(node)]:
                return NoMatch(f"the modulated product '{product.name}' is also read elsewhere")
            normalized, scale = _split_product(mul)
            return Modulation(mul, node, normalized, scale, node.inputs[1 - index])
    return NoMatch(f"Add '{node.name}' does not add a shift to a normalised activation times a scale")


def static_ints(tensor: gs.Tensor, depth: int = 10) -> np.ndarray | None:
    """The value of a small integer tensor computed from constants and static dims of shapes, or None."""
    value = constant_value(tensor)
    if value is not None:
        return np.asarray(value)
    node = _producer(tensor)
    if node is None or depth == 0:
        return None
    if node.op == "Shape":
        dims = list(node.inputs[0].shape or [])
        if not dims:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        return np.array([d if isinstance(d, int) and d >= 0 else None for d in dims[start:end]], dtype=object)
    args = [static_ints(t, depth - 1) for t in node.inputs]
    if any(a is None for a in args):
        return None
    if node.op == "Gather":
        return np.asarray(np.take(args[0], args[1], axis=node.attrs.get("axis", 0)))
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return args[0].reshape(-1) if args[0].ndim else args[0].reshape(1) if node.op == "Unsqueeze" else args[0]
    if node.op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=node.attrs.get("axis", 0))
    if node.op in ("Add", "Sub", "Mul", "Div"):
        if any(a.dtype == object and any(v is None for v in a.reshape(-1)) for a in args):
            return None
        a, b = (np.asarray(x, dtype=np.int64) for x in args)
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": np.trunc(a / b).astype(np.int64)}[node.op]
    return None


class _Rescaler:
    """Rewrites a reader's input V into V/m + a (see the module docstring); notes what it could not fold."""

    def __init__(self, ctx: CompileContext, pass_name: str):
        self.ctx, self.pass_name = ctx, pass_name
        self.explicit: list[str] = []
        self.absorbed: list[str] = []
        #: Tensors whose values the rewrite changed (in full or in the sliced region): those walked through.
        self.changed: set[str] = set()

    def rescale(self, tensor: gs.Tensor, reader: gs.Node, divide: np.ndarray, add: np.ndarray | None,
                shared_ok: bool = False) -> None:
        if np.all(divide == 1.0) and (add is None or not np.any(add)):
            return
        value = constant_value(tensor)
        if value is not None:
            self._set_input(reader, tensor, value.astype(np.float64) / divide + (0.0 if add is None else add))
            return
        if not shared_ok and ([id(n) for n in _readers(tensor)] != [id(reader)] or tensor in self.ctx.graph.outputs):
            return self._explicit(tensor, reader, divide, add, "it has other readers")
        node = _producer(tensor)
        rule = getattr(self, f"_through_{node.op.lower()}", None) if node is not None else None
        reason = rule(node, divide, add) if rule is not None else f"{node.op if node else 'a graph input'} writes it"
        if reason:
            self._explicit(tensor, reader, divide, add, reason)
        else:
            self.changed.add(tensor.name)

    # Each _through_<op> pushes V/m + a into the producer's inputs, or returns why it cannot.
    def _through_add(self, node, divide, add):
        constants = [t for t in node.inputs if constant_value(t) is not None]
        for tensor in node.inputs:
            takes_add = tensor is (constants[0] if constants else node.inputs[0])
            part_divide, part_add = _reduce(divide, tensor), _reduce(add, tensor) if takes_add else None
            if _broadcast_against(tensor, part_divide):  # e.g. PixArt's final (B, 1, C) embedding + (2, C) table
                self._explicit(tensor, node, part_divide, part_add, "the Add broadcasts it along an axis the scale "
                               "varies on")
            else:
                self.rescale(tensor, node, part_divide, part_add)

    def _through_mul(self, node, divide, add, op="Mul"):
        constant = next((t for t in node.inputs if constant_value(t) is not None), None)
        if constant is None or (add is not None and np.any(add)) or (op == "Div" and constant is not node.inputs[1]):
            return f"{op} '{node.name}' has no constant factor to take 1/m" if constant is None else \
                f"{op} '{node.name}' cannot take the shift"
        factor = constant_value(constant).astype(np.float64)
        self._set_input(node, constant, factor / divide if op == "Mul" else factor * divide)
        return None

    def _through_div(self, node, divide, add):
        return self._through_mul(node, divide, add, "Div")

    def _through_unsqueeze(self, node, divide, add):
        axes = node.attrs.get("axes") if "axes" in node.attrs else static_ints(node.inputs[1])
        axes = tuple(int(a) % divide.ndim for a in np.atleast_1d(axes))
        if any(divide.shape[a] != 1 for a in axes) or (add is not None and any(np.shape(add)[a] != 1 for a in axes)):
            return f"Unsqueeze '{node.name}' output is broadcast along an axis the scale varies on"
        squeeze = lambda v: None if v is None else np.squeeze(v, axis=axes)  # noqa: E731
        self.rescale(node.inputs[0], node, squeeze(divide), squeeze(add))

    def _through_cast(self, node, divide, add):
        dtype = node.inputs[0].dtype
        if node.attrs.get("to") != 1 or (dtype is not None and np.dtype(dtype) != np.float32):
            return f"Cast '{node.name}' changes the type"
        self.rescale(node.inputs[0], node, divide, add)

    def _through_reshape(self, node, divide, add):
        inner, outer = node.inputs[0].shape, node.outputs[0].shape
        if not inner or not outer or inner[0] != outer[0] or divide.shape[0] != 1 or \
                not all(isinstance(d, int) for d in list(inner[1:]) + list(outer[1:])):
            return f"Reshape '{node.name}' does not keep the batch axis with static other dims"
        move = lambda v: None if v is None else np.broadcast_to(v, (1, *outer[1:])).reshape(1, *inner[1:])  # noqa
        self.rescale(node.inputs[0], node, move(divide), move(add))

    def _through_slice(self, node, divide, add):
        bounds = _slice_bounds(node, divide.ndim)
        if bounds is None:
            return f"Slice '{node.name}' has bounds that are not static, or steps or several axes"
        axis, start, end = bounds
        source = node.inputs[0]
        size = (source.shape or [None] * divide.ndim)[axis] if source.shape and len(source.shape) == divide.ndim \
            else None
        if not isinstance(size, int) or divide.shape[axis] not in (1, min(end, size) - start):
            return f"the sliced axis of '{source.name}' has no static size matching the slice"
        for other in _readers(source):
            if other is not node and not _disjoint_slice(other, divide.ndim, axis, start, min(end, size)):
                return f"'{source.name}' is read by '{other.name}', which is not a disjoint slice"
        shape = list(divide.shape)
        shape[axis] = size
        region = tuple(slice(start, end) if i == axis else slice(None) for i in range(len(shape)))
        full_divide = np.ones(shape)
        full_divide[region] = divide
        full_add = None
        if add is not None:
            full_add = np.zeros(shape)
            full_add[region] = add
        self.rescale(source, node, full_divide, full_add, shared_ok=source not in self.ctx.graph.outputs)

    def _through_matmul(self, node, divide, add):
        unit = match_linear(node)
        vector = divide.reshape(-1) if unit and divide.shape[-1] == divide.size else None
        if not unit or vector is None or vector.size != constant_value(unit.weight).shape[unit.weight_out_axis]:
            return f"'{node.name}' is not a Linear whose output channels the scale runs along"
        shift = None if add is None or not np.any(add) else np.broadcast_to(add, divide.shape).reshape(-1)
        has_bias = node.op == "Gemm" and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None \
            and float(node.attrs.get("beta", 1.0)) != 0.0
        if shift is not None and not has_bias and (node.op != "Gemm" or len(node.inputs) > 2):
            return f"'{node.name}' has no constant bias to take the shift"
        weight = constant_value(unit.weight).astype(np.float64)
        self._set_input(node, unit.weight, weight / (vector[:, None] if unit.weight_out_axis == 0 else vector))
        if has_bias:
            beta = float(node.attrs.get("beta", 1.0))
            bias = constant_value(node.inputs[2]).astype(np.float64)
            self._set_input(node, node.inputs[2], bias / vector + (0.0 if shift is None else shift / beta))
        elif shift is not None:
            node.attrs["beta"] = 1.0
            node.inputs.append(self._constant(node.name, "bias", shift))
        self.absorbed.append(node.name)

    _through_gemm = _through_matmul

    def _set_input(self, node: gs.Node, tensor: gs.Tensor, value: np.ndarray) -> None:
        """A fresh constant for ``node``'s input (a constant shared with other nodes stays as it was)."""
        index = list(node.inputs).index(tensor)
        node.inputs[index] = self._constant(tensor.name, "modulation", value)

    def _constant(self, base: str, suffix: str, value: np.ndarray) -> gs.Constant:
        name = self.ctx.names.make(base, self.pass_name, suffix)
        return self.ctx.constant(name, np.asarray(value, dtype=np.float32))

    def _explicit(self, tensor, reader, divide, add, reason: str) -> None:
        """V' = V·(1/m) [+ a] on the edge V → reader only."""
        current = tensor
        steps = [("Mul", 1.0 / divide)] + ([("Add", add)] if add is not None and np.any(add) else [])
        shape = None if _broadcast_against(tensor, divide) else tensor.shape  # later rules read static dims
        for op, value in steps:
            out = gs.Variable(self.ctx.names.make(tensor.name, self.pass_name, op.lower()), dtype=np.float32,
                              shape=shape)
            node = gs.Node(op, self.ctx.names.make(tensor.name, self.pass_name, op), outputs=[out],
                           inputs=[current, self._constant(tensor.name, f"{op.lower()}_value", value)])
            node.doc_string = f"qcompile {self.pass_name}: per-channel rescale on the AdaLN path ({reason})"
            self.ctx.graph.nodes.append(node)
            current = out
        reader.inputs[[i for i, t in enumerate(reader.inputs) if t is tensor][0]] = current
        values = int(np.prod([d for d in (tensor.shape or [])[1:] if isinstance(d, int)] or [divide.size]))
        self.explicit.append(f"'{tensor.name}' ({'+'.join(op for op, _ in steps)} on {values} values per sample: "
                             f"{reason})")


def _reduce(value: np.ndarray | None, tensor: gs.Tensor) -> np.ndarray | None:
    """``value`` for an input of lower rank (broadcast): drop leading axes of size 1."""
    if value is None or constant_value(tensor) is not None or not tensor.shape:
        return value
    while value.ndim > len(tensor.shape) and value.shape[0] == 1:
        value = value[0]
    return value


def _broadcast_against(tensor: gs.Tensor, divide: np.ndarray) -> bool:
    """Whether a variable ``tensor`` has size 1 (is broadcast) on an axis where ``divide`` varies."""
    shape = tensor.shape
    if constant_value(tensor) is not None or not shape or len(shape) != divide.ndim:
        return False
    return any(dim == 1 and size > 1 for dim, size in zip(shape, divide.shape))


def _slice_bounds(node: gs.Node, rank: int) -> tuple[int, int, int] | None:
    """(axis, start, end) of a one-axis, step-1 Slice with static, non-negative bounds."""
    values = [static_ints(t) if t.name else None for t in node.inputs[1:]]
    if len(values) < 2 or any(v is None for v in values[:2]) or any(v is not None and v.dtype == object
                                                                     for v in values):
        return None
    starts, ends = np.atleast_1d(values[0]), np.atleast_1d(values[1])
    axes = np.atleast_1d(values[2]) if len(values) > 2 and values[2] is not None else np.arange(len(starts))
    steps = np.atleast_1d(values[3]) if len(values) > 3 and values[3] is not None else np.ones(len(starts))
    if len(starts) != 1 or np.any(steps != 1) or starts[0] < 0 or ends[0] < 0:
        return None
    return int(axes[0]) % rank, int(starts[0]), int(ends[0])


def _disjoint_slice(node: gs.Node, rank: int, axis: int, start: int, end: int) -> bool:
    bounds = _slice_bounds(node, rank) if node.op == "Slice" else None
    return bounds is not None and bounds[0] == axis and (bounds[2] <= start or bounds[1] >= end)


def fold_into_modulation(ctx: CompileContext, modulation: Modulation, scale: np.ndarray, shift: np.ndarray | None,
                         pass_name: str) -> tuple[list[str], list[str]]:
    """Make ``modulation`` write (X − shift)/scale along the last axis; (absorbing Linears, explicit edges).

    Explicit edges are also listed in ``ctx.fallbacks``. ValueError when a shift is asked of a
    modulation without a shift term.
    """
    rank = len(modulation.output.shape) if modulation.output.shape else 3
    divide = np.asarray(scale, np.float64).reshape((1,) * (rank - 1) + (-1,))
    add = None if shift is None else (-np.asarray(shift, np.float64) / np.asarray(scale, np.float64)).reshape(
        divide.shape)
    if add is not None and modulation.shift is None:
        raise ValueError(f"modulation '{modulation.node.name}' has no shift term to take the shift")
    rescaler = _Rescaler(ctx, pass_name)
    rescaler.rescale(modulation.scale, modulation.mul, _reduce(divide, modulation.scale), None)
    if modulation.shift is not None:
        rescaler.rescale(modulation.shift, modulation.add, _reduce(divide, modulation.shift), _reduce(add, modulation.shift))
    for note in rescaler.explicit:
        ctx.fallbacks.append(f"{pass_name}: modulation '{modulation.node.name}': explicit rescale of {note}")
    modulation.changed = rescaler.changed | {modulation.mul.outputs[0].name, modulation.output.name}
    return rescaler.absorbed, rescaler.explicit
