"""Keep an integer MatMul's bias Add where ORT's QDQ fusion can still see the MatMul.

ORT's ``MatMulAddFusion`` turns ``MatMul → Add(b)`` into ``Gemm`` before its QDQ fusions run; with a
static N-D activation shape it inserts ``Reshape → Gemm → Reshape``, and a float-bias Gemm fed by
DQ through a Reshape becomes neither QGemm nor MatMulIntegerToFloat, so the GEMM runs in float on
dequantized weights (measured on PixArt-α's static-batch export: 5 of 287 GEMMs integer).

Two exact rewrites keep the integer kernel:
- N-D activation (rank r > 2): the 1-D bias ``b[N]`` becomes ``b.reshape(1, …, 1, N)`` of rank r.
  Broadcasting gives the same sum bit for bit, and ORT's fusion accepts only a 1-D bias for N-D
  inputs, so ``DQ → MatMul`` stays a MatMulIntegerToFloat and the Add stays a float Add.
- 2-D activation: ``MatMul(x, W) + b`` → ``Gemm(x, W, b)``, so the target's int32 bias rule
  (``lowering.qdq.quantize_gemm_bias``) makes it a QGemm, as the exporter's own Gemms are.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.graph import constant_value

log = logging.getLogger(__name__)


def _bias_add(matmul: gs.Node) -> tuple[gs.Node, int, np.ndarray] | None:
    """The Add that is the MatMul's only reader and adds a constant 1-D bias of size N, with its
    bias input's index and value."""
    out = matmul.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    bias = constant_value(add.inputs[index])
    weight = constant_value(matmul.inputs[1].inputs[0].inputs[0]) if matmul.inputs[1].inputs else None
    n = weight.shape[-1] if weight is not None and weight.ndim == 2 else None
    if bias is None or bias.ndim != 1 or n is None or bias.shape[0] != n or add.inputs[1 - index] is not out:
        return None
    return add, index, bias


def _activation_shape(matmul: gs.Node, add: gs.Node) -> list | None:
    """The MatMul output's shape (same rank and leading dims as its activation input), from
    whichever of the tensors shape inference reached (a lowering's new tensors carry none)."""
    for tensor in (matmul.outputs[0], add.outputs[0], matmul.inputs[0]):
        if tensor.shape is not None:
            return list(tensor.shape)
    return None



def keep_matmul_bias_apart(ctx: CompileContext, matmuls: list[gs.Node], pass_name: str) -> tuple[int, int]:
    """Rewrite the bias of each integer MatMul in ``matmuls`` (see the module docstring).

    Returns (biases given the activation's rank, MatMul+Add pairs turned into Gemm)."""
    reshaped = gemms = 0
    for matmul in matmuls:
        found = _bias_add(matmul)
        if found is None:
            continue
        add, index, bias = found
        shape = _activation_shape(matmul, add)
        if shape is None:
            continue
        rank = len(shape)
        # Also where our inferred shape has symbolic dims: ORT's own inference may resolve them
        # (limited to static shapes, PixArt-α kept only 62 of 287 GEMMs integer), and the
        # broadcast is exact either way.
        if rank > 2:
            shaped = bias.reshape((1,) * (rank - 1) + bias.shape)
            add.inputs[index] = ctx.constant(ctx.names.make(add.inputs[index].name, pass_name, "rank"), shaped)
            reshaped += 1
        elif rank == 2 and matmul.outputs[0] not in ctx.graph.outputs:
            gemm = gs.Node("Gemm", ctx.names.make(matmul.name, pass_name, "Gemm"),
                           inputs=[matmul.inputs[0], matmul.inputs[1], add.inputs[index]],
                           outputs=list(add.outputs))
            gemm.doc_string = f"qcompile {pass_name}: MatMul '{matmul.name}' + Add '{add.name}' as one Gemm (QGemm)"
            matmul.outputs.clear()
            add.outputs.clear()
            ctx.graph.nodes.append(gemm)
            gemms += 1
    if reshaped or gemms:
        log.info("%d MatMul biases kept apart for MatMulIntegerToFloat, %d MatMul+Add pairs as Gemm", reshaped, gemms)
    return reshaped, gemms
