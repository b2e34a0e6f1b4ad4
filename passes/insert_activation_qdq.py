"""Pass ``insert_activation_qdq``: static per-tensor QuantizeLinear/DequantizeLinear on activations.

Rewrite:  GEMM(X, Ŵ) → GEMM(DQ(Q(X, s, z)), Ŵ)  for every GEMM whose weight is quantized, with
          s = (max − min)/(2^b − 1),  z = round(−min/s)  (uint8, min ≤ 0 ≤ max, from calibration)
and, for Conv, the same on the Conv output: ORT fuses DQ → Conv → Q into QLinearConv only when
the output is quantized too (MatMul fuses to MatMulIntegerToFloat without an output Q).
A Gemm's float bias C becomes DequantizeLinear(round(C/(s·s_w)), s·s_w) in int32: ORT fuses
DQ → Gemm into QGemm only with an int32 bias (|C − Ĉ| ≤ s·s_w/2, far below the GEMM's own error).
Below 8 bits a Clip to [s·(0 − z), s·(2^b − 1 − z)] precedes Q so the 8-bit container holds
only 2^b levels (simulated accuracy; the kernel still runs int8).
Error bound: |X − X̂| ≤ s/2 for X within the calibrated [min, max]; values outside are clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.graph import constant_value
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.quant import QuantSpec, scale_zero_point

_WEIGHT_DQ_GEMMS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class InsertActivationQDQConfig:
    quantize_conv_outputs: bool = True


def quantized_gemms(graph: gs.Graph) -> list[gs.Node]:
    """GEMMs whose weight is already integer: DQ-fed MatMul/Gemm/Conv, and MatMulNBits."""
    found = []
    for node in graph.nodes:
        if node.op == "MatMulNBits":
            found.append(node)
        elif node.op in _WEIGHT_DQ_GEMMS and len(node.inputs) > 1:
            producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
            if producer is not None and producer.op == "DequantizeLinear":
                found.append(node)
    return found


def _already_dequantized(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _weight_scale(node: gs.Node) -> np.ndarray:
    return node.inputs[1].inputs[0].inputs[1].values


def _quantized_by_successor(tensor: gs.Tensor) -> bool:
    return any(consumer.op == "QuantizeLinear" for consumer in tensor.outputs)


class InsertActivationQDQ(Pass):
    """Per-tensor static activation QDQ on quantized GEMM inputs (and Conv outputs)."""

    name = "insert_activation_qdq"
    Config = InsertActivationQDQConfig

    def call(self, ctx: CompileContext) -> PassResult:
        gemms = quantized_gemms(ctx.graph)
        inputs: dict[str, tuple[gs.Tensor, list[gs.Node]]] = {}
        for node in gemms:
            tensor = node.inputs[0]
            if not _already_dequantized(tensor):
                inputs.setdefault(tensor.name, (tensor, []))[1].append(node)
        outputs = {}
        if self.config.quantize_conv_outputs:
            for node in gemms:
                out = node.outputs[0]
                # Every consumer must read the DQ: ORT fuses Conv -> Q only when Q is its sole consumer.
                if node.op == "Conv" and not _quantized_by_successor(out):
                    outputs[out.name] = (out, list(out.outputs))
        targets = {**inputs, **outputs}
        if not targets:
            return PassResult(False, ("no quantized GEMM without activation QDQ",))
        axes = {name: (1 if any(c.op == "Conv" for c in consumers) else None)
                for name, (_, consumers) in targets.items()}
        stats = ctx.statistics(axes)
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        for name, (tensor, consumers) in targets.items():
            role = "Conv output (for QLinearConv fusion)" if name in outputs else "GEMM input"
            self._insert(ctx, tensor, consumers, stats[name], spec, role)
        ctx.graph.cleanup().toposort()
        return PassResult(True, (f"{len(inputs)} GEMM inputs and {len(outputs)} Conv outputs quantized",))

    def _insert(self, ctx: CompileContext, tensor: gs.Tensor, consumers: list[gs.Node], stats,
                spec: QuantSpec, role: str) -> None:
        scale, zero_point = scale_zero_point(stats.min, stats.max, spec)
        names = ctx.names
        base = tensor.name
        source = tensor
        dequantized = gs.Variable(names.make(base, self.name, "dequantized"), dtype=np.float32, shape=tensor.shape)
        if tensor in ctx.graph.outputs and role.startswith("Conv output"):
            # A graph output keeps its name: the Conv writes a new float tensor, the DQ writes the output.
            producer = tensor.inputs[0]
            source = gs.Variable(names.make(base, self.name, "float"), dtype=np.float32, shape=tensor.shape)
            producer.outputs[0] = source
            dequantized, tensor = tensor, source
        clip_after = role.startswith("Conv output")
        if spec.bits < 8 and not clip_after:
            source = self._narrowing_clip(ctx, base, source, scale, zero_point, spec)
        scale_c = ctx.constant(names.make(base, self.name, "scale"), np.array(scale, dtype=np.float32))
        zero_c = ctx.constant(names.make(base, self.name, "zero_point"), np.array(zero_point, dtype=np.uint8))
        quantized = gs.Variable(names.make(base, self.name, "quantized"), dtype=np.uint8, shape=tensor.shape)
        why = (f"qcompile {self.name}: {spec.describe()} activation ({role}); calibrated range "
               f"[{stats.min:.6g}, {stats.max:.6g}] over {stats.samples} samples")
        q = gs.Node("QuantizeLinear", names.make(base, self.name, "QuantizeLinear"),
                    inputs=[source, scale_c, zero_c], outputs=[quantized])
        dq = gs.Node("DequantizeLinear", names.make(base, self.name, "DequantizeLinear"),
                     inputs=[quantized, scale_c, zero_c], outputs=[dequantized])
        q.doc_string = dq.doc_string = why
        ctx.graph.nodes.extend([q, dq])
        if spec.bits < 8 and clip_after:
            # Clip after DQ: its bounds lie on the grid, so clip(DQ(Q(x))) = DQ(Q(clip(x))), and
            # Conv → Q stays adjacent for QLinearConv fusion.
            dequantized = self._clip_after(ctx, base, dq, scale, zero_point, spec)
        for consumer in consumers:
            for index, value in enumerate(consumer.inputs):
                if value is tensor:
                    consumer.inputs[index] = dequantized
            if consumer.op == "Gemm" and len(consumer.inputs) > 2:
                self._quantize_gemm_bias(ctx, consumer, float(scale))
        lowering = "simulated (narrowed int8 container)" if spec.bits < 8 else "QDQ (fused by ORT)"
        owners = list(tensor.inputs) if role.startswith("Conv output") else consumers
        for owner in owners:
            ctx.records.append(QuantRecord(owner.name, base, "activation", spec.describe(), lowering, self.name,
                                           {"scale": float(scale), "zero_point": int(zero_point), "position": role}))

    def _quantize_gemm_bias(self, ctx: CompileContext, gemm: gs.Node, activation_scale: float) -> None:
        bias = constant_value(gemm.inputs[2])
        if bias is None or float(gemm.attrs.get("beta", 1.0)) != 1.0 or bias.ndim != 1:
            return
        bias_scale = (activation_scale * _weight_scale(gemm) * np.ones_like(bias)).astype(np.float32)
        bias_int = np.rint(bias / bias_scale).astype(np.int32)
        names, base = ctx.names, gemm.inputs[2].name
        out = gs.Variable(names.make(base, self.name, "dequantized"), dtype=np.float32, shape=list(bias.shape))
        dq = gs.Node("DequantizeLinear", names.make(base, self.name, "DequantizeLinear"), attrs={"axis": 0},
                     inputs=[ctx.constant(names.make(base, self.name, "int32"), bias_int),
                             ctx.constant(names.make(base, self.name, "scale"), bias_scale),
                             ctx.constant(names.make(base, self.name, "zero_point"), np.zeros_like(bias_int))],
                     outputs=[out])
        dq.doc_string = f"qcompile {self.name}: int32 bias of Gemm '{gemm.name}' (scale = s_x·s_w) for QGemm fusion"
        ctx.graph.nodes.append(dq)
        gemm.inputs[2] = out

    def _narrowing_clip(self, ctx: CompileContext, base: str, tensor: gs.Tensor, scale, zero_point,
                        spec: QuantSpec) -> gs.Variable:
        """Clip to [s·(qmin − z), s·(qmax − z)]: an 8-bit container holding only 2^b levels."""
        names = ctx.names
        low = np.array(scale * (spec.qmin - int(zero_point)), dtype=np.float32)
        high = np.array(scale * (spec.qmax - int(zero_point)), dtype=np.float32)
        clipped = gs.Variable(names.make(base, self.name, "clipped"), dtype=np.float32, shape=tensor.shape)
        clip = gs.Node("Clip", names.make(base, self.name, "Clip"),
                       inputs=[tensor, ctx.constant(names.make(base, self.name, "clip_min"), low),
                               ctx.constant(names.make(base, self.name, "clip_max"), high)],
                       outputs=[clipped])
        clip.doc_string = f"qcompile {self.name}: narrows the uint8 container to {spec.bits} bits (simulated)"
        ctx.graph.nodes.append(clip)
        return clipped

    def _clip_after(self, ctx: CompileContext, base: str, dq: gs.Node, scale, zero_point,
                    spec: QuantSpec) -> gs.Tensor:
        """Put a narrowing Clip behind ``dq``; returns the tensor consumers should read.

        When the DQ writes a graph output, the Clip takes over that output (its name is kept)."""
        dequantized = dq.outputs[0]
        if dequantized in ctx.graph.outputs:
            inner = gs.Variable(ctx.names.make(base, self.name, "unclipped"), dtype=np.float32,
                                shape=dequantized.shape)
            dq.outputs[0] = inner
            clipped = self._narrowing_clip(ctx, base, inner, scale, zero_point, spec)
            clip = clipped.inputs[0]
            clip.outputs[0] = dequantized
            return dequantized
        return self._narrowing_clip(ctx, base, dequantized, scale, zero_point, spec)
