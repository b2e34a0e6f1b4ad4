"""Pass ``insert_activation_qdq``: static per-tensor QuantizeLinear/DequantizeLinear on activations.

Rewrite:  GEMM(X, Ŵ) → GEMM(DQ(Q(X, s, z)), Ŵ)  for every GEMM whose weight is quantized, with
          s = (max − min)/(2^b − 1),  z = round(−min/s)  (uint8, min ≤ 0 ≤ max, from calibration)
Tensors that ``dgq_groups`` planned are left to the target, which lowers their groups.
Decision only, no rewrite: every quantized Conv's output also gets a per-tensor 8-bit grid on the
context (``ctx.output_grids``), computed from the same calibration run; a target whose runtime
fuses a quantized output (ORT: DQ → Conv → Q into QLinearConv) inserts it at lowering time. An
output is not a GEMM input: it is re-quantized only because such a kernel writes integers, so it
gets the kernel's full 8 bits whatever ``--abits`` is (6-bit outputs would add error no GEMM needs).
Below 8 bits a Clip to [s·(0 − z), s·(2^b − 1 − z)] precedes Q so the 8-bit container holds
only 2^b levels (simulated accuracy; the kernel still runs int8).
Error bound: |X − X̂| ≤ s/2 for X within the calibrated [min, max]; values outside are clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.grids import OutputGrid, quantized_gemms
from qcompiler.lowering.qdq import insert_tensor_qdq
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.quant import QuantSpec, scale_zero_point


@dataclass(frozen=True)
class InsertActivationQDQConfig:
    #: Give quantized Conv outputs a grid too (the ORT target needs it for QLinearConv).
    quantize_conv_outputs: bool = True


def _already_dequantized(tensor: gs.Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _quantized_by_successor(tensor: gs.Tensor) -> bool:
    return any(consumer.op == "QuantizeLinear" for consumer in tensor.outputs)


class InsertActivationQDQ(Pass):
    """Per-tensor static activation QDQ on quantized GEMM inputs; grids for Conv outputs."""

    name = "insert_activation_qdq"
    Config = InsertActivationQDQConfig

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "for activation ranges")

    def call(self, ctx: CompileContext) -> PassResult:
        gemms = quantized_gemms(ctx.graph)
        planned = set(ctx.group_plans or {})
        inputs: dict[str, tuple[gs.Tensor, list[gs.Node]]] = {}
        for node in gemms:
            tensor = node.inputs[0]
            if not _already_dequantized(tensor) and tensor.name not in planned:
                inputs.setdefault(tensor.name, (tensor, []))[1].append(node)
        outputs: dict[str, gs.Node] = {}
        # A Conv whose input has run-time (per-timestep) scales runs in float: no QLinearConv to feed.
        runtime_scaled = {name for name, plan in (ctx.group_plans or {}).items() if plan.timesteps is not None}
        if self.config.quantize_conv_outputs:
            for node in gemms:
                out = node.outputs[0]
                if node.op == "Conv" and node.inputs[0].name in runtime_scaled:
                    continue
                if node.op == "Conv" and not _quantized_by_successor(out) and out.name not in ctx.output_grids:
                    outputs[out.name] = node
        if not inputs and not outputs:
            return PassResult(False, ("no quantized GEMM without activation QDQ",))
        axes = {name: (1 if any(c.op == "Conv" for c in consumers) else None)
                for name, (_, consumers) in inputs.items()}
        axes.update({name: 1 for name in outputs})
        stats = ctx.statistics(axes, per_index=False)  # ranges only: derived ones serve across folds
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        for name, (tensor, consumers) in inputs.items():
            self._insert(ctx, tensor, consumers, stats[name], spec)
        output_spec = QuantSpec(bits=8, symmetric=False)
        for name, node in outputs.items():
            scale, zero_point = scale_zero_point(stats[name].min, stats[name].max, output_spec)
            ctx.output_grids[name] = OutputGrid(name, node.name, float(scale), int(zero_point), output_spec,
                                                float(stats[name].min), float(stats[name].max), stats[name].samples)
        ctx.graph.cleanup().toposort()
        return PassResult(bool(inputs), (f"{len(inputs)} GEMM inputs quantized; grids for {len(outputs)} Conv "
                                         "outputs (inserted by the target where its runtime fuses them)",))

    def _insert(self, ctx: CompileContext, tensor: gs.Tensor, consumers: list[gs.Node], stats,
                spec: QuantSpec) -> None:
        scale, zero_point = scale_zero_point(stats.min, stats.max, spec)
        why = (f"qcompile {self.name}: {spec.describe()} activation (GEMM input); calibrated range "
               f"[{stats.min:.6g}, {stats.max:.6g}] over {stats.samples} samples")
        name = tensor.name
        insert_tensor_qdq(ctx, tensor, consumers, float(scale), int(zero_point), spec, self.name, why,
                          output_side=False)
        lowering = "simulated (narrowed int8 container)" if spec.bits < 8 else "QDQ (fused by the target)"
        for owner in consumers:
            ctx.records.append(QuantRecord(owner.name, name, "activation", spec.describe(), lowering, self.name,
                                           {"scale": float(scale), "zero_point": int(zero_point),
                                            "position": "GEMM input"}))
