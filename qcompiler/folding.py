"""Fold per-channel shifts and scales X' = (X − z)/s into the GEMMs that read X and the node that writes X.

Shared by ``smooth_scales`` (SmoothQuant), ``shift_scale`` (OS+) and later learned scales.
A scale group is an activation X with every Linear (or, on request, Conv) that reads it along
one channel axis; they share one s (C,) and z (C,). ``fold`` rewrites, with the ORIGINAL W:

    consumers:  W'[k, :] = s_k · W[k, :]        b' = b + z·W          (so X'·W' + b' = X·W + b)
    producer writes X' = (X − z)/s instead of X:
        LayerNorm / GroupNorm / InstanceNorm+Reshape+Mul+Add affine:  γ' = γ/s,  β' = (β − z)/s
        AdaLN modulation X = N·S + T (DiT, PixArt): S' = S/s, T' = (T − z)/s, pushed up into the
            modulation Linear's rows or a constant table (``qcompiler.modulation``)
        Linear or Conv (output channel j):  W_p[:, j]' = W_p[:, j]/s_j,  b_p' = (b_p − z)/s
        V projection of an attention whose output X feeds the out-projection: softmax rows sum
            to 1 and attention mixes tokens only, so (P·V − z)/s = P·((V − z)/s); folded only when
            the path V-proj → head split → P·V → head merge keeps channel order (checked here).
    otherwise (X after GELU/SiLU, a graph input, or X also read by a residual Add): an explicit
        Sub(z) and Mul(1/s) before the consumers, noted in ``ctx.fallbacks`` with its run-time cost.

Exact in real arithmetic; in float32 a few ulp (constants computed in float64, rounded once). A
shift is exact for a Conv reader only without padding (a padded 0 of X' stands for X = z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.fold_tracking import SHAPE_ONLY, keep_statistics, node_inputs
from qcompiler.graph import constant_value
from qcompiler.modulation import Modulation, fold_into_modulation, match_modulation, static_ints
from qcompiler.patterns import Conv, Linear, NoMatch, Norm, match_conv, match_linear, match_norm, weight_array



@dataclass(eq=False)
class ScaleGroup:
    """An activation X and the GEMMs reading it along ``channel_axis`` (negative), sharing one s and z."""

    tensor: gs.Tensor
    consumers: tuple[Linear | Conv, ...]
    channel_axis: int

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def channels(self) -> int:
        unit = self.consumers[0]
        return weight_array(unit).shape[unit.weight_in_axis]

    @property
    def shift_exact(self) -> bool:
        """A shift folds exactly unless a consumer Conv pads (padded zeros of X' stand for X = z)."""
        return all(isinstance(u, Linear) or (not any(u.node.attrs.get("pads", []))
                                             and u.node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
                   for u in self.consumers)


def find_scale_groups(graph: gs.Graph, include_conv: bool = False) -> list[ScaleGroup]:
    """Scale groups in graph order: per activation, its Linear readers (else its group-1 Conv readers)."""
    linears: dict[str, list] = {}
    convs: dict[str, list] = {}
    tensors: dict[str, gs.Tensor] = {}  # first-seen order = graph order
    for node in graph.nodes:
        unit = match_linear(node) or (match_conv(node) if include_conv else None)
        if not unit or constant_value(node.inputs[0]) is not None:
            continue
        if isinstance(unit, Conv) and node.attrs.get("group", 1) != 1:
            continue  # grouped Conv: input channel j meets only its group's filters; not needed yet
        tensors.setdefault(unit.input.name, unit.input)
        (linears if isinstance(unit, Linear) else convs).setdefault(unit.input.name, []).append(unit)
    return [ScaleGroup(tensor, tuple(linears[name]), -1) if name in linears
            else ScaleGroup(tensor, tuple(convs[name]), 1 - weight_array(convs[name][0]).ndim)
            for name, tensor in tensors.items()]


@dataclass(frozen=True)
class Absorber:
    """What writes X and can take (X − z)/s into its own constants; ``path`` is the attention path."""

    kind: str  # a Norm's op type, "Linear", "Conv", "AdaLN modulation" or "value projection"
    unit: Norm | Linear | Conv | Modulation
    path: tuple[gs.Node, ...] = ()

    def describe(self) -> str:
        node = self.unit.nodes[0] if isinstance(self.unit, Norm) else self.unit.node
        return f"{self.kind}: '{node.name}'" + (f" through {len(self.path)} attention nodes" if self.path else "")


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _value_readers(tensor: gs.Tensor) -> list[gs.Node]:
    return [node for node in tensor.outputs if node.op not in SHAPE_ONLY]


def _linear_writing(tensor: gs.Tensor) -> Linear | None:
    node = _producer(tensor)
    if node is not None and node.op == "Add":
        node = next((_producer(t) for t in node.inputs if _producer(t) is not None), None)
    unit = match_linear(node) if node is not None and node.op in ("MatMul", "Gemm") else None
    return unit if unit and unit.output is tensor else None


def _norm_writing(tensor: gs.Tensor) -> Norm | None:
    node = _producer(tensor)
    for _ in range(4):  # InstanceNorm form: Add(β) ← Mul(γ) ← Reshape ← InstanceNormalization
        if node is None or node.op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
            break
        node = next((_producer(t) for t in node.inputs if _producer(t) is not None), None)
    norm = match_norm(node) if node is not None else None
    return norm if norm and norm.output is tensor else None


def find_absorber(graph: gs.Graph, group: ScaleGroup) -> Absorber | NoMatch:
    """The producer that can absorb (X − z)/s for ``group``, or why none can."""
    x = group.tensor
    others = [n.name for n in _value_readers(x) if all(n is not u.node for u in group.consumers)]
    if x in graph.outputs:
        others.append("the graph output")
    if others:
        return NoMatch(f"'{x.name}' is also read by {', '.join(others)}, which must keep reading X")
    norm = _norm_writing(x)
    if norm:
        return _check_norm(norm, group)
    linear = _linear_writing(x)
    if linear and linear.node.op == "Gemm" and _bias_slot(linear) is None and len(linear.node.inputs) > 2 \
            and float(linear.node.attrs.get("beta", 1.0)) != 0.0:
        return NoMatch(f"Gemm '{linear.node.name}' adds a non-constant C, which cannot be divided by s")
    if linear:
        return _check_axis(Absorber("Linear", linear), -1, group)
    conv = match_conv(x.inputs[0]) if x.inputs else None
    if conv:
        return _check_axis(Absorber("Conv", conv), 1 - weight_array(conv).ndim, group)
    modulation = match_modulation(x)
    if modulation:
        return _check_axis(Absorber("AdaLN modulation", modulation), -1, group)
    return _value_projection(graph, group)


def _check_axis(absorber: Absorber, axis: int, group: ScaleGroup) -> Absorber | NoMatch:
    return absorber if axis == group.channel_axis else NoMatch(
        f"{absorber.describe()} writes channels on axis {axis}, the GEMMs read axis {group.channel_axis}")


def _check_norm(norm: Norm, group: ScaleGroup) -> Absorber | NoMatch:
    gamma = constant_value(norm.gamma)
    if gamma.size != group.channels:
        return NoMatch(f"{norm.kind} '{norm.nodes[0].name}' has {gamma.size} affine values, not one per channel "
                       f"({group.channels})")
    if norm.beta is not None and constant_value(norm.beta) is None:
        return NoMatch(f"the β of {norm.kind} '{norm.nodes[0].name}' is not constant")
    if norm.kind == "GroupNormalization":  # γ runs along axis 1, which is also a Conv reader's channel axis
        shape = group.tensor.shape or norm.nodes[0].inputs[0].shape
        axis = 1 - len(shape) if shape else group.channel_axis if isinstance(group.consumers[0], Conv) else None
    else:
        axis = _affine_axis(gamma.shape, group.channels)
    if axis is None:
        return NoMatch(f"cannot tell which axis the γ of {norm.kind} '{norm.nodes[0].name}' scales")
    return _check_axis(Absorber(norm.kind, norm), axis, group)


def _affine_axis(shape: tuple[int, ...], channels: int) -> int | None:
    """The (negative) axis of a broadcast affine constant of shape e.g. (C,) or (C, 1, 1)."""
    hits = [index for index, dim in enumerate(shape) if dim == channels]
    if len(hits) != 1 or any(dim != 1 for index, dim in enumerate(shape) if index != hits[0]):
        return None
    return hits[0] - len(shape)


def _trailing(node: gs.Node, count: int) -> tuple[int, ...] | None:
    """The last ``count`` output dims of a Reshape: from shape inference, else its constant shape."""
    dims = list(node.outputs[0].shape or [])[-count:]
    if len(dims) == count and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    shape = static_ints(node.inputs[1])  # a constant, or computed from static dims (Concat of Shape parts)
    if shape is not None and len(shape) >= count and all(isinstance(d, (int, np.integer)) and d > 0
                                                          for d in shape[-count:]):
        return tuple(int(d) for d in shape[-count:])
    return None


def _is_probabilities(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Softmax over the last axis: rows sum to 1 along the axis P·V contracts."""
    node = _producer(tensor)
    if node is None or node.op != "Softmax":
        return False
    default = -1 if int(graph.opset) >= 13 else 1  # Softmax-1/11 default to axis 1 (flattened)
    axis, rank = node.attrs.get("axis", default), len(tensor.shape or ())
    return axis == -1 or (rank > 0 and axis == rank - 1)


def _is_float_cast(node: gs.Node) -> bool:
    """A Cast to float32 of a float32 tensor (exporters leave these after attention): the identity."""
    dtype = node.inputs[0].dtype if node.inputs else None
    return node.op == "Cast" and node.attrs.get("to") == 1 and dtype is not None and np.dtype(dtype) == np.float32


def _value_projection(graph: gs.Graph, group: ScaleGroup) -> Absorber | NoMatch:
    """Walk X ← merge ← P·V ← split ← V-proj, then check forward that channel c stays channel c."""
    if group.channel_axis != -1:
        return NoMatch(f"'{group.name}' is not written by a Norm, Linear, Conv or attention")
    tensor, path, value_matmul = group.tensor, [], None
    while len(path) < 8:
        node = _producer(tensor)
        linear = _linear_writing(tensor) if value_matmul is not None else None
        if linear:
            return _check_value_path(graph, linear, tuple(reversed(path)), group)
        if node is not None and (node.op in ("Reshape", "Transpose") or _is_float_cast(node)):
            path.append(node)
            tensor = node.inputs[0]
        elif node is not None and node.op == "MatMul" and value_matmul is None \
                and _is_probabilities(graph, node.inputs[0]):
            value_matmul = node
            path.append(node)
            tensor = node.inputs[1]
        else:
            break
    return NoMatch(f"'{group.name}' is not written by a Norm, Linear, Conv, or an attention whose V "
                   "projection is reachable through Reshape/Transpose/P·V")


def _check_value_path(graph: gs.Graph, linear: Linear, path: tuple[gs.Node, ...],
                      group: ScaleGroup) -> Absorber | NoMatch:
    """Track channel c = h·D + d as (axis, size) pairs through the path; it must end whole on axis −1."""
    channels = group.channels
    state = [(-1, channels)]
    tensor = linear.output
    for node in path:
        if _value_readers(tensor) != [node] or tensor in graph.outputs:
            return NoMatch(f"'{tensor.name}' on the attention path has other readers")
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", []))
            state = [(perm.index(axis + len(perm)) - len(perm), size) for axis, size in state] if perm else []
        elif node.op == "Reshape":
            state = _reshape_state(node, state, channels)
        elif node.op == "Cast":
            pass  # a float32 → float32 Cast (checked on the way up) keeps every value
        elif state[-1][0] != -1 or any(axis > -3 for axis, _ in state[:-1]):
            state = []  # P·V contracts V's axis −2: channels must sit on axis −1 and batch axes only
        if not state:
            return NoMatch(f"{node.op} '{node.name}' moves channels between the V projection and '{group.name}'")
        tensor = node.outputs[0]
    if state != [(-1, channels)]:
        return NoMatch(f"channels of '{group.name}' are not whole on the last axis after the attention path")
    return Absorber("value projection", linear, path)


def _reshape_state(node: gs.Node, state: list, channels: int) -> list:
    """Follow a Reshape that splits C into (H, D) on the last two axes, merges them back, or keeps them."""
    if state == [(-1, channels)]:
        split = _trailing(node, 2)
        if _trailing(node, 1) == (channels,):
            return state
        if split is not None and split[0] * split[1] == channels:
            return [(-2, split[0]), (-1, split[1])]
        return []
    if [axis for axis, _ in state] == [-2, -1]:
        if _trailing(node, 1) == (channels,):
            return [(-1, channels)]
        if _trailing(node, 2) == tuple(size for _, size in state):
            return state
    return []


def along_axis(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector to broadcast along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = vector.size
    return vector.reshape(shape)


def _set_constant(ctx: CompileContext, node: gs.Node, index: int, value: np.ndarray, pass_name: str) -> None:
    """Give input ``index`` of ``node`` a new value; a constant that other nodes share is copied first."""
    tensor, original = node.inputs[index], constant_value(node.inputs[index])
    # Spilled (large values only): a pass that folds every weight of a 2.4 GB model would
    # otherwise hold a second copy of it in memory until the model is written.
    value = ctx.spill(value.astype(original.dtype if original is not None else np.float32))
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
        tensor.values = value
    else:
        node.inputs[index] = ctx.constant(ctx.names.make(tensor.name, pass_name, "folded"), value)


def _bias_slot(unit: Linear | Conv) -> tuple[gs.Node, int] | None:
    """Where a constant per-output bias lives: the bias Add's operand, Gemm's C (β ≠ 0) or Conv's B."""
    if isinstance(unit, Linear) and unit.bias_node is not None:
        return unit.bias_node, list(unit.bias_node.inputs).index(unit.bias)
    node = unit.node
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and constant_value(node.inputs[2]) is not None:
        if node.op == "Conv" or float(node.attrs.get("beta", 1.0)) != 0.0:
            return node, 2
    return None


def _update_bias(ctx: CompileContext, unit: Linear | Conv, divide: np.ndarray | None, add: np.ndarray | None,
                 pass_name: str) -> None:
    """b ← b/divide + add on the output channels of ``unit`` (adding a bias where it has none)."""
    slot, node = _bias_slot(unit), unit.node
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if slot is not None:
        bias = constant_value(slot[0].inputs[slot[1]]).astype(np.float64) / (1.0 if divide is None else divide)
        _set_constant(ctx, slot[0], slot[1], bias + (add / beta if add is not None else 0.0), pass_name)
    elif add is None or not np.any(add):
        return
    elif node.op in ("Conv", "Gemm") and len(node.inputs) == 2:
        if node.op == "Gemm":
            node.attrs["beta"] = 1.0  # β only multiplies C, which is created here
        node.inputs.append(ctx.constant(ctx.names.make(node.name, pass_name, "bias"), add.astype(np.float32)))
    else:  # a MatMul without bias (or a Gemm whose C is not constant): add one after it
        out = unit.output
        inner = gs.Variable(ctx.names.make(out.name, pass_name, "unbiased"), dtype=out.dtype, shape=out.shape)
        producer = out.inputs[0]
        producer.outputs[producer.outputs.index(out)] = inner
        bias = ctx.constant(ctx.names.make(out.name, pass_name, "bias"), add.astype(np.float32))
        add_node = gs.Node("Add", ctx.names.make(out.name, pass_name, "Add"), inputs=[inner, bias], outputs=[out])
        add_node.doc_string = f"qcompile {pass_name}: bias created to carry z·W of a folded shift"
        ctx.graph.nodes.append(add_node)


def _fold_into_consumer(ctx: CompileContext, unit: Linear | Conv, scale, shift, pass_name: str) -> None:
    """W'[k] = s_k·W[k] along the input axis; b' = b + z·W with the original W (and Gemm's α)."""
    unit = match_linear(unit.node) if isinstance(unit, Linear) else match_conv(unit.node)  # bias may be new
    weight = weight_array(unit).astype(np.float64)
    axis = unit.weight_in_axis
    if shift is not None:
        delta = np.tensordot(weight, shift, axes=([axis], [0]))  # (out, *kernel) for Conv
        delta = delta.reshape(delta.shape[0], -1).sum(axis=1) * float(unit.node.attrs.get("alpha", 1.0))
        _update_bias(ctx, unit, None, delta, pass_name)
    _set_constant(ctx, unit.node, 1, weight * along_axis(scale, axis, weight.ndim), pass_name)


def _replace_in_norm(ctx: CompileContext, norm: Norm, tensor: gs.Tensor, value: np.ndarray, pass_name: str) -> None:
    owner = next(node for node in norm.nodes if tensor in node.inputs)
    _set_constant(ctx, owner, list(owner.inputs).index(tensor), value, pass_name)


def _absorb(ctx: CompileContext, absorber: Absorber, scale, shift, pass_name: str) -> None:
    """The producer writes (X − z)/s: its affine or output-channel constants are divided by s."""
    unit, minus = absorber.unit, -shift / scale if shift is not None else None
    if isinstance(unit, Modulation):
        fold_into_modulation(ctx, unit, scale, shift, pass_name)  # explicit edges go to ctx.fallbacks
        ctx.rescaled_tensors.add(unit.output.name)
        return
    if isinstance(unit, Norm):
        gamma = constant_value(unit.gamma).astype(np.float64)
        axis = _affine_axis(gamma.shape, scale.size) if gamma.ndim > 1 else -1
        divide, add = along_axis(scale, axis, gamma.ndim), along_axis(minus, axis, gamma.ndim) if shift is not None else 0.0
        _replace_in_norm(ctx, unit, unit.gamma, gamma / divide, pass_name)
        if unit.beta is not None:
            _replace_in_norm(ctx, unit, unit.beta, constant_value(unit.beta) / divide + add, pass_name)
        elif shift is not None:  # only LayerNormalization gets here (see fold): β is optional there
            unit.nodes[0].inputs.append(ctx.constant(ctx.names.make(unit.nodes[0].name, pass_name, "beta"),
                                                     add.astype(np.float32)))
        return
    weight = weight_array(unit).astype(np.float64)
    _set_constant(ctx, unit.node, 1, weight / along_axis(scale, unit.weight_out_axis, weight.ndim), pass_name)
    _update_bias(ctx, unit, scale, minus, pass_name)  # biases are (N,), (1, N) or Gemm's broadcast C
    ctx.rescaled_tensors.update({unit.node.outputs[0].name, unit.output.name})


def _insert_explicit(ctx: CompileContext, group: ScaleGroup, scale, shift, pass_name: str, reason: str) -> str:
    """X' = (X − z)·(1/s) as Sub/Mul nodes read only by the group's GEMMs; noted in ctx.fallbacks."""
    x, names = group.tensor, ctx.names
    shape = (scale.size,) + (1,) * (-group.channel_axis - 1)
    current, ops = x, []
    steps = ([("Sub", shift)] if shift is not None else []) + [("Mul", 1.0 / scale)]
    for op, value in steps:
        out = gs.Variable(names.make(x.name, pass_name, op.lower()), dtype=np.float32, shape=x.shape)
        node = gs.Node(op, names.make(x.name, pass_name, op), outputs=[out],
                       inputs=[current, ctx.constant(names.make(x.name, pass_name, f"{op.lower()}_value"),
                                                     value.reshape(shape).astype(np.float32))])
        node.doc_string = (f"qcompile {pass_name}: explicit per-channel {'shift' if op == 'Sub' else '1/scale'} "
                           f"of '{x.name}' for its GEMMs; no producer could absorb it ({reason})")
        ctx.graph.nodes.append(node)
        current, ops = out, ops + [op]
    for unit in group.consumers:
        unit.node.inputs[0] = current
    cost = f"{len(ops)} elementwise op{'s' if len(ops) > 1 else ''} ({'+'.join(ops)})"
    ctx.fallbacks.append(f"{pass_name}: '{x.name}' scaled explicitly before "
                         f"{', '.join(u.node.name for u in group.consumers)}: costs {cost} at run time; {reason}")
    return f"explicit: {cost}"


def fold(ctx: CompileContext, group: ScaleGroup, scale: np.ndarray, shift: np.ndarray | None = None,
         pass_name: str = "fold_scales") -> str:
    """Rewrite the graph so ``group``'s GEMMs read X' = (X − shift)/scale; outputs are unchanged.

    Returns what took the rewrite as ``"<kind>: <detail>"`` (kind: a Norm op, ``Linear``,
    ``Conv``, ``value projection`` or ``explicit``). Raises ValueError for a non-positive or
    non-finite scale, a wrong length, or a shift the group cannot take exactly (padded Conv).
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1) if shift is not None and np.any(shift) else None
    if any(v.size != group.channels or not np.all(np.isfinite(v)) for v in (scale, shift) if v is not None) \
            or np.any(scale <= 0):
        raise ValueError(f"fold '{group.name}': scale and shift must be {group.channels} finite values, scale > 0")
    if shift is not None and not group.shift_exact:
        raise ValueError(f"fold '{group.name}': a shift is not exact for a padded Conv reader")
    absorber = find_absorber(ctx.graph, group)
    if absorber and isinstance(absorber.unit, Norm) and shift is not None and absorber.unit.beta is None \
            and absorber.kind != "LayerNormalization":
        absorber = NoMatch(f"{absorber.describe()} has no β to take the shift")
    if absorber and isinstance(absorber.unit, Modulation) and shift is not None and absorber.unit.shift is None:
        absorber = NoMatch(f"{absorber.describe()} has no shift term to take the shift")
    if not absorber:  # fold into the consumers exactly the float32 z and 1/s the explicit nodes will apply
        scale = 1.0 / np.float32(1.0 / scale).astype(np.float64)
        shift = shift.astype(np.float32).astype(np.float64) if shift is not None else None
    before = node_inputs(ctx.graph)
    for unit in group.consumers:
        _fold_into_consumer(ctx, unit, scale, shift, pass_name)
    if absorber:
        _absorb(ctx, absorber, scale, shift, pass_name)
    result = absorber.describe() if absorber else _insert_explicit(ctx, group, scale, shift, pass_name,
                                                                   absorber.reason)
    keep_statistics(ctx, group.tensor, group.consumers[0].node.inputs[0], [u.node for u in group.consumers],
                     group.channel_axis, scale, shift, before,
                     absorber.unit if absorber and isinstance(absorber.unit, Modulation) else None)
    return result


def norm_absorber(ctx: CompileContext, tensor: gs.Tensor, readers: list[gs.Node], channels: int):
    """The Norm that can write (X − shift)/scale along the last axis for ``readers``, or None.

    Only when ``readers`` are all of the tensor's value readers (nothing else may see the change) and
    the Norm's affine runs along the last axis with ``channels`` values. Changes nothing."""
    if tensor in ctx.graph.outputs or {id(n) for n in _value_readers(tensor)} != {id(n) for n in readers}:
        return None
    norm = _norm_writing(tensor)
    if not norm or (norm.beta is not None and constant_value(norm.beta) is None):
        return None
    gamma = constant_value(norm.gamma)
    if norm.kind == "GroupNormalization" or gamma.size != channels or _affine_axis(gamma.shape, channels) != -1:
        return None
    if norm.beta is None and norm.kind != "LayerNormalization":
        return None
    return norm


def absorb_into_norm(ctx: CompileContext, tensor: gs.Tensor, readers: list[gs.Node], scale: np.ndarray,
                     shift: np.ndarray, pass_name: str) -> str | None:
    """Make the Norm that writes ``tensor`` write (X − shift)/scale along the last axis, if it can
    (``norm_absorber``). Returns what absorbed it, or None (the caller then scales explicitly).
    Exact in real arithmetic (constants in float64)."""
    norm = norm_absorber(ctx, tensor, readers, np.asarray(scale).size)
    if norm is None:
        return None
    before = node_inputs(ctx.graph)
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    _absorb(ctx, Absorber(norm.kind, norm), scale, shift, pass_name)
    ctx.rescaled_tensors.add(tensor.name)
    keep_statistics(ctx, tensor, tensor, readers, -1, scale, shift, before)
    return Absorber(norm.kind, norm).describe()
