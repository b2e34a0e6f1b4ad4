"""Int4 weight values stored packed in the file, unpacked by ONNX Runtime when the session loads.

ORT's CPU kernels for Conv and Gemm take int8 weights (QLinearConv, QGemm), so a W4 Conv/Gemm weight is
lowered as int4 values in an int8 container: ``DequantizeLinear(W_q int8, s, 0)``. Stored that way the
file holds a byte per value. This rewrite stores every such constant whose values all lie in the int4
range [−8, 7] as ONNX INT4 (two values per byte) behind a ``Cast`` to INT8:

    DequantizeLinear(W_q, s, z)  →  DequantizeLinear(Cast(W_q as INT4, to=INT8), s, z)

The Cast of a constant is folded by ORT's constant folding before its QDQ fusions run, so the session
sees the same int8 initializer as before and still fuses QLinearConv/QGemm: the outputs are bit-identical
and only the file shrinks. INT4 and Cast to/from it need opset 21; the graph's opset is raised only where
that changes no op's meaning (``block_dq.changed_ops`` is empty), otherwise the containers stay and the
note says why.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.lowering.block_dq import BLOCK_OPSET, changed_ops, int4_constant, raise_opset

INT4_RANGE = (-8, 7)


def _int4_weights(graph: gs.Graph, min_elements: int) -> dict[str, tuple[np.ndarray, list[gs.Node]]]:
    """{constant name: (its int8 values, its DequantizeLinear readers)} for constants that fit int4."""
    found: dict[str, tuple[np.ndarray, list[gs.Node]]] = {}
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        weight = node.inputs[0]
        if weight.name in found:
            found[weight.name][1].append(node)
            continue
        if np.dtype(weight.dtype) != np.int8:  # from the tensor's type: float and uint8 constants are never read
            continue
        values = np.asarray(weight.values)
        if values.size >= min_elements and values.min() >= INT4_RANGE[0] and values.max() <= INT4_RANGE[1]:
            found[weight.name] = (values, [node])
    return found


def pack_int4_weights(graph: gs.Graph, min_elements: int = 64) -> tuple[int, int, list[str]]:
    """Rewrite the graph as the module docstring says; (constants packed, bytes saved, notes)."""
    found = _int4_weights(graph, min_elements)
    if not found:
        return 0, 0, []
    blocking = changed_ops(graph, BLOCK_OPSET)
    if blocking:
        return 0, 0, [f"{len(found)} int4 weights kept in int8 containers: opset {graph.opset} → {BLOCK_OPSET} "
                      f"(INT4 storage) would change {', '.join(sorted(blocking))}"]
    notes = raise_opset(graph, BLOCK_OPSET)
    saved = 0
    for name, (values, readers) in found.items():
        unpacked = gs.Variable(f"{name}/unpacked", dtype=np.int8, shape=list(values.shape))
        graph.nodes.append(gs.Node("Cast", f"{name}/Cast_int4_to_int8", attrs={"to": onnx.TensorProto.INT8},
                                   inputs=[int4_constant(f"{name}/int4", values)], outputs=[unpacked]))
        for reader in readers:
            reader.inputs[0] = unpacked
        saved += values.size - (values.size + 1) // 2
    return len(found), saved, notes
