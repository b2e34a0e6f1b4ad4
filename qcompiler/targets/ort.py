"""The ONNX Runtime target (CPU; CUDA sessions where onnxruntime-gpu is installed).

What ORT fuses into integer kernels, and so what this target emits:
- DQ(int8 per-channel W) → MatMul with a per-tensor uint8 activation DQ → MatMulIntegerToFloat;
- DQ → Conv → Q → QLinearConv: the Conv output is quantized with the grid the pass recorded
  (``ctx.output_grids``), because ORT fuses a Conv only with a quantized output; where a Conv is
  lowered another way (K-split, simulated groups) the same grid is a simulated Q/DQ, so those
  reference forms differ from the deployed one only in how the groups are lowered;
- DQ → Gemm → QGemm only with an int32 bias: C becomes DQ(round(C/(s_x·s_w)), s_x·s_w);
- DQ → MatMul → Add(b): the bias gets the activation's rank (2-D: MatMul+Add → Gemm), so ORT's
  MatMulAddFusion leaves the integer MatMul alone (``lowering.matmul_bias``);
- int4 MatMul weights: MatMulNBits (chosen by ``quantize_weights``; see docs/architecture.md);
- Q-DiT plans (``ctx.dynamic_group_plans``): per-token, per-group run-time scales around one
  MatMulInteger per Linear (``lowering.dynamic_groups``; ``dynamic_groups="simulate"``: float);
- DGQ group plans (``ctx.group_plans``): ``channel_groups="affine"`` (default) gives one per-tensor
  DequantizeLinear over DGQ's own codes and folds the affine into the GEMM's weight and bias
  (``lowering.channel_affine``), so every GEMM keeps one integer kernel; "split" (K partial
  integer GEMMs, the bit-exact reference), "fold" (shared zero point, ratios in W) and "simulate"
  (per-channel QDQ before a float GEMM) are kept for comparison.
- per-timestep and TDQ tables: scales gathered by the timestep input rescale the int32 sums of
  one integer GEMM per channel group (MatMulIntegerToFloat, ConvInteger; ``timestep_groups``:
  "auto" keeps the forms that run slower as integer on ORT's CPU simulated: Convs, Linears under
  96 input channels, K > 1 groups);
What it cannot run on an integer kernel (log2 attention, Conv pixel groups,
sub-8-bit activations' accuracy) stays simulated and is labelled so in every record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.errors import QCompileError
from qcompiler.graph import constant_value
from qcompiler.grids import quantized_gemms
from qcompiler.lowering import dynamic_groups
from qcompiler.lowering.matmul_bias import keep_matmul_bias_apart
from qcompiler.lowering.qdq import insert_tensor_qdq, quantize_gemm_bias
from qcompiler.lowering.int4_storage import pack_int4_weights
from qcompiler.pass_manager import PassResult
from qcompiler.targets import Target
from qcompiler.targets.ort_groups import (
    CHANNEL_GROUP_MODES,
    TIMESTEP_GROUP_MODES,
    affine_run_time_ops,
    lower_group_plans,
)


@dataclass(frozen=True)
class OrtTargetConfig:
    #: DGQ channel groups: "affine" (one GEMM, DGQ's codes), "split", "fold" or "simulate".
    channel_groups: str = "affine"
    #: Q-DiT group plans: "integer" (one integer GEMM (MatMulIntegerToFloat) per Linear) or "simulate" (float MatMul on X̂).
    dynamic_groups: str = "integer"
    device: str = "cpu"
    #: DGQ's channel affine subtracts the calibrated mean of the weight error it runs from the bias
    #: (``channel_affine.fold_affine``); False leaves the bias exact to DGQ's codes and Ŵ'.
    bias_correction: bool = True
    #: int4 Conv/Gemm weight values (int8 containers for QLinearConv/QGemm): "packed" stores them as ONNX INT4
    #: behind a Cast that ORT folds at load (opset 21, where raising it changes no op), "container" as int8.
    int4_storage: str = "packed"
    #: Per-timestep / TDQ tables: "integer" (integer GEMMs whose sums the gathered scales rescale),
    #: "simulate" (fake quantization with the gathered scales before float GEMMs) or "auto" (integer
    #: where that is the faster form on ORT's CPU: one-group tables and token groups on MatMul/Gemm of K ≥ 96).
    timestep_groups: str = "auto"

    def __post_init__(self):
        if self.timestep_groups not in TIMESTEP_GROUP_MODES:
            raise ValueError(f"OrtTargetConfig: timestep_groups must be one of {TIMESTEP_GROUP_MODES}, "
                             f"got {self.timestep_groups!r}")
        if self.int4_storage not in ("packed", "container"):
            raise ValueError(f"OrtTargetConfig: int4_storage must be 'packed' or 'container', got {self.int4_storage!r}")
        if self.dynamic_groups not in dynamic_groups.MODES:
            raise ValueError(f"OrtTargetConfig: dynamic_groups must be one of {dynamic_groups.MODES}, "
                             f"got {self.dynamic_groups!r}")
        if self.channel_groups not in CHANNEL_GROUP_MODES:
            raise ValueError(f"OrtTargetConfig: channel_groups must be one of {CHANNEL_GROUP_MODES}, "
                             f"got {self.channel_groups!r}")


def _per_tensor_quantizer(node) -> bool:
    """A QuantizeLinear with one scale: what ORT needs right after a Conv to fuse QLinearConv (a
    per-axis one, as DGQ's affine puts on the next Conv's input, does not count)."""
    if node.op != "QuantizeLinear":
        return False
    scale = constant_value(node.inputs[1])
    return scale is not None and scale.size == 1


class OrtTarget(Target):
    """Lowers to the QDQ forms ONNX Runtime fuses into integer kernels; see the module docstring."""

    name = "ort"
    Config = OrtTargetConfig

    def affine_ops(self, ctx: CompileContext, tensor, shared_zero_point: bool) -> int:
        # Every channel-group mode is judged by the affine lowering's cost: "split" is its reference
        # and must see the same plans.
        return affine_run_time_ops(ctx, tensor, shared_zero_point, self.config.bias_correction)

    def lower(self, ctx: CompileContext) -> PassResult:
        notes = []
        if ctx.group_plans:
            notes.append(lower_group_plans(ctx, self.config.channel_groups, self.name,
                                           self.config.bias_correction, self.config.timestep_groups))
        if ctx.dynamic_group_plans:
            notes.append(dynamic_groups.lower_dynamic_group_plans(ctx, self.config.dynamic_groups, self.name))
        outputs = self._quantize_conv_outputs(ctx)
        matmuls = [node for node in quantized_gemms(ctx.graph) if node.op == "MatMul"]
        ranked, gemms = keep_matmul_bias_apart(ctx, matmuls, self.name)
        biases = sum(quantize_gemm_bias(ctx, node, self.name) for node in list(ctx.graph.nodes) if node.op == "Gemm")
        ctx.graph.cleanup().toposort()
        # The float weights the rules kept for the DGQ affine are not needed past lowering.
        ctx.weight_rules = {name: replace(rule, source=None) for name, rule in ctx.weight_rules.items()}
        notes.append(f"{outputs} Conv outputs quantized for QLinearConv; {biases} Gemm biases in int32 for QGemm; "
                     f"{ranked} MatMul biases kept apart from MatMulAddFusion, {gemms} MatMul+Add as Gemm")
        packed = 0
        if self.config.int4_storage == "packed":
            packed, saved, storage_notes = pack_int4_weights(ctx.graph)
            notes.extend(storage_notes)
            if packed:
                notes.append(f"{packed} int4 weights stored packed (ONNX INT4, Cast to int8 folded by ORT at load): "
                             f"{saved:,} bytes smaller")
                ctx.graph.cleanup().toposort()
        changed = (bool(ctx.group_plans) or bool(ctx.dynamic_group_plans) or outputs > 0 or biases > 0 or ranked > 0
                   or gemms > 0 or packed > 0)
        return PassResult(changed, tuple(notes))

    def _quantize_conv_outputs(self, ctx: CompileContext) -> int:
        tensors = ctx.graph.tensors()
        integer = {id(node) for node in quantized_gemms(ctx.graph)}
        done = 0
        for name, grid in ctx.output_grids.items():
            tensor = tensors.get(name)
            producer = tensor.inputs[0] if tensor is not None and tensor.inputs else None
            if producer is None:
                continue
            fused = producer.op == "Conv" and id(producer) in integer
            if fused and any(_per_tensor_quantizer(c) for c in tensor.outputs):
                done += self._share_existing_qdq(ctx, tensor)
                continue
            if fused:
                why = (f"qcompile {self.name}: {grid.spec.describe()} output of Conv '{producer.name}' so ORT "
                       f"fuses DQ → Conv → Q into QLinearConv")
                lowering = "simulated (narrowed int8 container)" if grid.spec.bits < 8 else "QDQ (fused by ORT)"
            else:
                # The Conv was lowered another way (DGQ's K-split, simulated groups): its output still gets
                # the grid the pass decided, simulated, so these reference forms differ from the deployed
                # one only in how the groups are lowered.
                why = (f"qcompile {self.name}: {grid.spec.describe()} output grid of Conv '{grid.node}', "
                       f"simulated: this lowering has no QLinearConv to fuse it into")
                lowering = "simulated (Conv output grid of the deployed form)"
            why += (f"; calibrated range [{grid.calibrated_min:.6g}, {grid.calibrated_max:.6g}] over "
                    f"{grid.samples} samples")
            insert_tensor_qdq(ctx, tensor, list(tensor.outputs), grid.scale, grid.zero_point, grid.spec, self.name,
                              why, output_side=True)
            ctx.records.append(QuantRecord(grid.node, name, "activation", grid.spec.describe(), lowering,
                                           self.name, {"scale": grid.scale, "zero_point": grid.zero_point,
                                                       "position": "Conv output (for QLinearConv fusion)"}))
            done += 1
        return done

    @staticmethod
    def _share_existing_qdq(ctx: CompileContext, tensor) -> int:
        """The Conv output already feeds a per-tensor Q/DQ (the next GEMM's input grid): let every
        other reader read that DQ too, so the Q is the Conv's only consumer and ORT fuses
        QLinearConv. One grid serves both roles, as one tensor can hold only one."""
        q = next(c for c in tensor.outputs if _per_tensor_quantizer(c))
        dq = next((c for c in q.outputs[0].outputs if c.op == "DequantizeLinear"), None)
        others = [c for c in tensor.outputs if c is not q]
        if dq is None or not others or tensor in ctx.graph.outputs:
            return 0
        for reader in others:
            for index, value in enumerate(reader.inputs):
                if value is tensor:
                    reader.inputs[index] = dq.outputs[0]
        return 1

    def check_model(self, model, source: str) -> None:
        from qcompiler.runtimes.ort import unknown_ops

        missing = unknown_ops(model)
        if missing:
            name, domain, op = missing[0]
            more = f" (and {len(missing) - 1} more nodes)" if len(missing) > 1 else ""
            raise QCompileError(f"{source}: node '{name}' is {domain + ':' if domain else ''}{op}, an op ONNX Runtime "
                                f"has no kernel for{more}; export the model with standard ONNX ops")

    def count_kernels(self, model_path: str | os.PathLike):
        from qcompiler.runtimes.ort import count_kernels

        return count_kernels(model_path, device=self.config.device)
