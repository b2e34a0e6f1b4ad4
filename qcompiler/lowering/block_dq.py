"""Int4 MatMul weights as a standard blocked DequantizeLinear (opset 21), and raising a graph's opset to 21.

``MatMulNBits(A, packed, scales)`` (ONNX Runtime's contrib op, what ``quantize_weights`` emits at W4)
becomes the standard form
    MatMul(A, DequantizeLinear(W_q, s, axis=0, block_size=g)),   W_q int4 [K, N], s float [⌈K/g⌉, N]
with Ŵ[k, n] = W_q[k, n]·s[⌊k/g⌋, n]: blocks run along K, the reduction axis, one scale per block and
output column, the same values MatMulNBits computes with (zero point 0, symmetric). The int4 values
are stored packed, two per byte (ONNX INT4). ORT fuses the pair back into MatMulNBits; TensorRT runs it
as an int4 weight-only GEMM.

Opset: DequantizeLinear takes ``block_size`` and int4 from opset 21 on. A graph whose every op has the
same meaning at 21 (only new input types, or new attributes whose defaults keep the old behaviour, in
the versions between: ``UNCHANGED_MEANING``) just has its opset set; any other op is converted by
``onnx.version_converter`` (one node at a time, so weights never go through it); a node that cannot be
converted is refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompiler.errors import QCompileError
from qcompiler.graph import constant_value
from qcompiler.lowering.matmul_nbits import unpack_matmul_nbits

BLOCK_OPSET = 21
#: Ops whose versions up to 21 only add input types (float8, int4, string) or attributes whose
#: defaults keep the old behaviour (Cast/QuantizeLinear ``saturate`` for float8 only, Pad ``wrap``,
#: Resize ``half_pixel_symmetric``, AveragePool ``dilations``, Split ``num_outputs``): ONNX Changelog.
UNCHANGED_MEANING = frozenset({
    "Constant", "ConstantOfShape", "Shape", "Size", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose",
    "Identity", "Cast", "CastLike", "Equal", "Pad", "Resize", "AveragePool", "Split", "If", "Loop", "Scan",
    "QuantizeLinear", "DequantizeLinear", "ScatterND", "ScatterElements", "LpPool",
})


class Int4Constant(gs.Constant):
    """A constant of ONNX INT4 (two values per byte), kept as its packed TensorProto: onnx-graphsurgeon
    exports a LazyValues proto as it is but cannot pack a numpy int4 array, so reading ``values``
    unpacks a copy and never replaces the proto."""

    @property
    def values(self):
        return self._values.load() if isinstance(self._values, LazyValues) else self._values

    @values.setter
    def values(self, values):
        self._values = values


def int4_constant(name: str, values: np.ndarray) -> gs.Constant:
    import ml_dtypes

    proto = onnx.numpy_helper.from_array(np.asarray(values).astype(ml_dtypes.int4), name)
    return Int4Constant(name, LazyValues(proto))


def blocked_weight(node: gs.Node) -> tuple[np.ndarray, np.ndarray, int]:
    """(W_q int8 [K, N], scales [⌈K/g⌉, N], g) of a MatMulNBits node."""
    k, n, block = int(node.attrs["K"]), int(node.attrs["N"]), int(node.attrs["block_size"])
    q = unpack_matmul_nbits(constant_value(node.inputs[1]), k)  # [N, K]
    scales = constant_value(node.inputs[2]).reshape(n, -1)  # [N, blocks]
    return np.ascontiguousarray(q.T), np.ascontiguousarray(scales.T.astype(np.float32)), block


def lower_matmul_nbits(graph: gs.Graph, node: gs.Node, names, pass_name: str) -> gs.Node:
    """Replace ``node`` (MatMulNBits) by MatMul(A, blocked DequantizeLinear); returns the MatMul."""
    if len(node.inputs) > 3 and any(t.name for t in node.inputs[3:]):
        raise QCompileError(f"MatMulNBits '{node.name}' has zero points, g_idx or a bias; only the symmetric "
                            "form quantize_weights writes can be lowered to a blocked DequantizeLinear")
    q, scales, block = blocked_weight(node)
    base = node.inputs[1].name
    weight = gs.Variable(names.make(base, pass_name, "dequantized"), dtype=np.float32, shape=list(q.shape))
    dq = gs.Node("DequantizeLinear", names.make(base, pass_name, "DequantizeLinear"),
                 attrs={"axis": 0, "block_size": block},
                 inputs=[int4_constant(names.make(base, pass_name, "int4"), q),
                         gs.Constant(names.make(base, pass_name, "scale"), scales)],
                 outputs=[weight])
    dq.doc_string = (f"qcompile {pass_name}: int4 weight of '{node.name}', blocks of {block} along K (reduction "
                     "axis), zero point 0: weight-only int4 for TensorRT")
    matmul = gs.Node("MatMul", node.name, inputs=[node.inputs[0], weight], outputs=list(node.outputs))
    matmul.doc_string = getattr(node, "doc_string", "") or ""
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend([dq, matmul])
    return matmul


def changed_ops(graph: gs.Graph, target: int = BLOCK_OPSET) -> dict[str, list[str]]:
    """{op: [node names]} of default-domain ops whose meaning may differ between the graph's opset and ``target``."""
    changed: dict[str, list[str]] = {}
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx") or node.op in UNCHANGED_MEANING:
            continue
        try:
            old = onnx.defs.get_schema(node.op, graph.opset).since_version
            new = onnx.defs.get_schema(node.op, target).since_version
        except onnx.defs.SchemaError:
            continue
        if old != new:
            changed.setdefault(node.op, []).append(node.name)
    return changed


def raise_opset(graph: gs.Graph, target: int = BLOCK_OPSET) -> list[str]:
    """Set the graph's default-domain opset to ``target``, converting changed ops; returns notes."""
    if graph.opset >= target:
        return []
    notes = [f"opset {graph.opset} → {target}"]
    for op, nodes in changed_ops(graph, target).items():
        for name in nodes:
            node = next(n for n in graph.nodes if n.name == name)
            _convert_node(graph, node, target)
        notes.append(f"{len(nodes)} {op} converted by onnx.version_converter")
    graph.opset = target
    # onnx-graphsurgeon exports ``import_domains`` as the opset imports: keep the default domain's in step,
    # and drop com.microsoft once no node uses it (MatMulNBits was its only user here).
    used = {node.domain or "" for node in graph.nodes}
    graph.import_domains = [onnx.helper.make_opsetid("", target)] + [
        entry for entry in (graph.import_domains or []) if entry.domain not in ("", "ai.onnx") and entry.domain in used]
    return notes


def _convert_node(graph: gs.Graph, node: gs.Node, target: int) -> None:
    """Convert one node with onnx.version_converter on a one-node model (constant inputs as initializers)."""
    inputs = [t for t in node.inputs if t.name]
    value = lambda t: onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(t.dtype or np.float32)), None)
    proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                  name=node.name, **node.attrs)
    model = onnx.helper.make_model(
        onnx.helper.make_graph([proto], "one", [value(t) for t in inputs if not isinstance(t, gs.Constant)],
                               [value(t) for t in node.outputs],
                               [onnx.numpy_helper.from_array(t.values, t.name) for t in inputs
                                if isinstance(t, gs.Constant)]),
        opset_imports=[onnx.helper.make_opsetid("", graph.opset)])
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises C++ errors of several types
        raise QCompileError(f"node '{node.name}' ({node.op}, opset {graph.opset}) cannot be converted to opset "
                            f"{target} for int4 block weights: {str(exc).splitlines()[0][:200]}") from None
    sub = gs.import_onnx(converted)
    tensors = graph.tensors()
    swap = {t.name: tensors[t.name] for t in [*node.inputs, *node.outputs] if t.name in tensors}
    for new in sub.nodes:
        for index, tensor in enumerate(list(new.inputs)):
            new.inputs[index] = swap.get(tensor.name, tensor)
        for index, tensor in enumerate(list(new.outputs)):
            new.outputs[index] = swap.get(tensor.name, tensor)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(sub.nodes)
