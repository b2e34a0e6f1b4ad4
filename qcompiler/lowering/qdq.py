"""Per-tensor QuantizeLinear/DequantizeLinear insertion, narrowing Clips and int32 GEMM biases.

``insert_tensor_qdq`` rewrites  consumers(X) → consumers(DQ(Q(X, s, z), s, z))  for one tensor,
named ``<tensor>/<pass>/<Op>`` with a doc_string that says why. Below 8 bits a Clip to
[s·(q_min − z), s·(q_max − z)] narrows the uint8 container to 2^b levels (simulated accuracy):
before Q on a GEMM input, after DQ on a GEMM output (its bounds lie on the grid, so
clip(DQ(Q(x))) = DQ(Q(clip(x))), and GEMM → Q stays adjacent for fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.graph import constant_value
from qcompiler.quant import QuantSpec


def insert_tensor_qdq(ctx: CompileContext, tensor: gs.Tensor, consumers: list[gs.Node], scale: float,
                      zero_point: int, spec: QuantSpec, pass_name: str, why: str, output_side: bool) -> None:
    """Put Q/DQ(s, z) on ``tensor`` for ``consumers``; ``output_side`` for a GEMM output (Clip after DQ)."""
    names, base, source = ctx.names, tensor.name, tensor
    dequantized = gs.Variable(names.make(base, pass_name, "dequantized"), dtype=np.float32, shape=tensor.shape)
    if tensor in ctx.graph.outputs and output_side:
        # A graph output keeps its name: the GEMM writes a new float tensor, the DQ writes the output.
        producer = tensor.inputs[0]
        source = gs.Variable(names.make(base, pass_name, "float"), dtype=np.float32, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = source
        dequantized, tensor = tensor, source
    if spec.bits < 8 and not output_side:
        source = narrowing_clip(ctx, base, source, scale, zero_point, spec, pass_name)
    scale_c = ctx.constant(names.make(base, pass_name, "scale"), np.array(scale, dtype=np.float32))
    zero_c = ctx.constant(names.make(base, pass_name, "zero_point"), np.array(zero_point, dtype=np.uint8))
    quantized = gs.Variable(names.make(base, pass_name, "quantized"), dtype=np.uint8, shape=tensor.shape)
    q = gs.Node("QuantizeLinear", names.make(base, pass_name, "QuantizeLinear"),
                inputs=[source, scale_c, zero_c], outputs=[quantized])
    dq = gs.Node("DequantizeLinear", names.make(base, pass_name, "DequantizeLinear"),
                 inputs=[quantized, scale_c, zero_c], outputs=[dequantized])
    q.doc_string = dq.doc_string = why
    ctx.graph.nodes.extend([q, dq])
    if spec.bits < 8 and output_side:
        dequantized = _clip_after(ctx, base, dq, scale, zero_point, spec, pass_name)
    for consumer in consumers:
        for index, value in enumerate(consumer.inputs):
            if value is tensor:
                consumer.inputs[index] = dequantized


def narrowing_clip(ctx: CompileContext, base: str, tensor: gs.Tensor, scale: float, zero_point: int,
                   spec: QuantSpec, pass_name: str) -> gs.Variable:
    """Clip to [s·(qmin − z), s·(qmax − z)]: an 8-bit container holding only 2^b levels."""
    names = ctx.names
    low = np.array(scale * (spec.qmin - int(zero_point)), dtype=np.float32)
    high = np.array(scale * (spec.qmax - int(zero_point)), dtype=np.float32)
    clipped = gs.Variable(names.make(base, pass_name, "clipped"), dtype=np.float32, shape=tensor.shape)
    clip = gs.Node("Clip", names.make(base, pass_name, "Clip"),
                   inputs=[tensor, ctx.constant(names.make(base, pass_name, "clip_min"), low),
                           ctx.constant(names.make(base, pass_name, "clip_max"), high)],
                   outputs=[clipped])
    clip.doc_string = f"qcompile {pass_name}: narrows the uint8 container to {spec.bits} bits (simulated)"
    ctx.graph.nodes.append(clip)
    return clipped


def _clip_after(ctx: CompileContext, base: str, dq: gs.Node, scale: float, zero_point: int, spec: QuantSpec,
                pass_name: str) -> gs.Tensor:
    """A narrowing Clip behind ``dq``; when the DQ writes a graph output, the Clip takes over its name."""
    dequantized = dq.outputs[0]
    if dequantized in ctx.graph.outputs:
        inner = gs.Variable(ctx.names.make(base, pass_name, "unclipped"), dtype=np.float32, shape=dequantized.shape)
        dq.outputs[0] = inner
        clipped = narrowing_clip(ctx, base, inner, scale, zero_point, spec, pass_name)
        clipped.inputs[0].outputs[0] = dequantized
        return dequantized
    return narrowing_clip(ctx, base, dequantized, scale, zero_point, spec, pass_name)


def quantize_gemm_bias(ctx: CompileContext, gemm: gs.Node, pass_name: str) -> bool:
    """C → DequantizeLinear(round(C/(s_x·s_w)), s_x·s_w) in int32 when X and W are DQ-fed; |C − Ĉ| ≤ s_x·s_w/2.

    Returns whether the bias was rewritten (constant 1-D C, β = 1, a per-tensor activation DQ)."""
    if len(gemm.inputs) < 3 or float(gemm.attrs.get("beta", 1.0)) != 1.0:
        return False
    bias = constant_value(gemm.inputs[2])
    x_dq = gemm.inputs[0].inputs[0] if gemm.inputs[0].inputs else None
    w_dq = gemm.inputs[1].inputs[0] if gemm.inputs[1].inputs else None
    if bias is None or bias.ndim != 1 or x_dq is None or x_dq.op != "DequantizeLinear" or w_dq is None \
            or w_dq.op != "DequantizeLinear":
        return False
    x_scale, w_scale = constant_value(x_dq.inputs[1]), constant_value(w_dq.inputs[1])
    if x_scale is None or w_scale is None or np.size(x_scale) != 1:
        return False
    bias_scale = (float(np.reshape(x_scale, ())) * w_scale * np.ones_like(bias)).astype(np.float32)
    bias_int = np.rint(bias / bias_scale).astype(np.int32)
    names, base = ctx.names, gemm.inputs[2].name
    out = gs.Variable(names.make(base, pass_name, "dequantized"), dtype=np.float32, shape=list(bias.shape))
    dq = gs.Node("DequantizeLinear", names.make(base, pass_name, "DequantizeLinear"), attrs={"axis": 0},
                 inputs=[ctx.constant(names.make(base, pass_name, "int32"), bias_int),
                         ctx.constant(names.make(base, pass_name, "scale"), bias_scale),
                         ctx.constant(names.make(base, pass_name, "zero_point"), np.zeros_like(bias_int))],
                 outputs=[out])
    dq.doc_string = f"qcompile {pass_name}: int32 bias of Gemm '{gemm.name}' (scale = s_x·s_w) for QGemm fusion"
    ctx.graph.nodes.append(dq)
    gemm.inputs[2] = out
    return True
