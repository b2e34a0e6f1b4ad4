"""The TensorRT target: explicit-quantization ONNX (Q/DQ) that TensorRT builds into INT8/INT4 engines.

TensorRT's explicit-quantization rules (its developer guide's "Explicit Quantization" chapter, the
ONNX parser's Q/DQ support, NVIDIA ModelOpt's ONNX placement) and what this target emits for each:
- int8, symmetric, zero point 0, constant scales: every activation grid a pass decided (uint8,
  asymmetric) becomes int8 zero point 0, by an exact shift folded into the producer's bias/affine
  where one takes it, else into an explicit Sub before the Q, and by a symmetric range covering the
  calibrated one only before a padded Conv (``lowering.symmetric``);
- weights stored int8 with a DequantizeLinear only, per channel on the output axis (Conv 0,
  ConvTranspose 1, MatMul the last axis, Gemm 0 with transB else 1): ``quantize_weights`` already
  writes that form (W4 Conv/Gemm: int4 values in an int8 container);
- int4 MatMul weights: a blocked DequantizeLinear along K (opset 21, block 32/64/128, INT4 packed
  two per byte) instead of ORT's MatMulNBits (``lowering.block_dq``); TensorRT runs int4 weight-only,
  so those GEMMs read their activation in float (the activation Q/DQ would only add error);
- Q/DQ only on GEMM/Conv inputs (the passes' placement); attention BMMs and Softmax stay float;
  Conv outputs are not re-quantized (ORT needs that for QLinearConv, TensorRT fuses without it);
- what TensorRT cannot run is replaced by a near equivalent and listed in ``fallbacks``
  (``targets.tensorrt_groups``): DGQ groups (symmetric affine or per-tensor), per-timestep ranges
  (static), log2 attention (float), sub-8-bit activations (8 bits over the same range);
  anything else the rules reject (``targets.tensorrt_rules``) is refused with one line naming the node;
- refused before any work (``check_recipe``): recipes whose plans need run-time activation scales
  (``qdit``: dynamic per-token, per-group ranges).
ONNX Runtime runs the output too (CPU tests compare it with the ORT target); ``runtimes.tensorrt``
builds a strongly typed engine from it where ``tensorrt`` imports.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace

import onnx

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.errors import QCompileError
from qcompiler.lowering.block_dq import BLOCK_OPSET, lower_matmul_nbits, raise_opset
from qcompiler.lowering.symmetric import activation_pairs, make_symmetric
from qcompiler.pass_manager import PassResult
from qcompiler.targets import Target
from qcompiler.targets.tensorrt_groups import lower_group_plans, remove_log2_attention


#: Passes that lower their own GEMMs to ops with run-time scales, and why TensorRT has no near equivalent.
RUNTIME_SCALE_PASSES = {
    "qdit_groups": "its plans quantize every Linear's input per token and channel group with scales "
                   "computed at run time; TensorRT takes constant Q/DQ scales only and blocked weights only as "
                   "int4 weight-only, so nothing near keeps Q-DiT's groups (use --target ort)",
}


@dataclass(frozen=True)
class TensorRTTargetConfig:
    #: Check the lowered graph against ``tensorrt_rules`` (refuse, naming the node, on any violation).
    check_rules: bool = True


class TensorRTTarget(Target):
    """Lowers to TensorRT's explicit-quantization Q/DQ form; see the module docstring."""

    name = "tensorrt"
    Config = TensorRTTargetConfig

    def check_model(self, model: onnx.ModelProto, source: str) -> None:
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise QCompileError(f"{source}: node '{node.name}' is {node.domain}:{node.op_type}, which TensorRT's "
                                    "ONNX parser has no layer for; export the model with standard ONNX ops")

    def check_recipe(self, recipe) -> None:
        for step in recipe.steps:
            if step.pass_name in RUNTIME_SCALE_PASSES:
                raise QCompileError(f"recipe '{recipe.name}' cannot target '{self.name}': pass '{step.pass_name}': "
                                    f"{RUNTIME_SCALE_PASSES[step.pass_name]}")

    def lower(self, ctx: CompileContext) -> PassResult:
        if ctx.dynamic_group_plans:
            raise QCompileError(f"target '{self.name}': qdit's run-time per-token, per-group activation scales are "
                                f"not expressible on TensorRT (constant per-tensor scales only; "
                                f"{len(ctx.dynamic_group_plans)} Linears planned); use --target ort")
        notes = []
        replaced = remove_log2_attention(ctx, self.name)
        if replaced:
            notes.append(f"log2 attention on {replaced} Softmax outputs replaced by float")
        if ctx.group_plans:
            notes.append(lower_group_plans(ctx, self.name))
        blocked = self._blocked_weights(ctx)
        weight_only = self._weight_only_inputs(ctx, blocked)
        forms = Counter()
        for pair in activation_pairs(ctx.graph):
            details = make_symmetric(ctx, pair, self.name)
            forms[details["form"]] += 1
            if details["bits_replaced"]:
                ctx.fallbacks.append(f"{self.name}: {details['bits_replaced']}-bit activation '{pair.source.name}' "
                                     "runs as int8 over the same range (TensorRT's integer kernels are 8-bit)")
            self._record(ctx, pair, details)
        if blocked:
            notes.extend(raise_opset(ctx.graph, BLOCK_OPSET))
        ctx.output_grids = {}  # TensorRT fuses a Conv without a quantized output
        ctx.graph.cleanup().toposort()
        ctx.weight_rules = {name: replace(rule, source=None) for name, rule in ctx.weight_rules.items()}
        notes.append(f"activations: {dict(forms)}; {len(blocked)} int4 MatMul weights as blocked DequantizeLinear "
                     f"({weight_only} activation Q/DQ dropped: int4 is weight-only on TensorRT)")
        if self.config.check_rules:
            self._check(ctx)
        return PassResult(True, tuple(notes))

    def _record(self, ctx: CompileContext, pair, details: dict) -> None:
        """The pass's record of this activation says how TensorRT gets it (one record per reading GEMM)."""
        readers = {r.name for dq in pair.dequantize for r in dq.outputs[0].outputs}
        mine = [r for r in ctx.records if r.role == "activation" and r.tensor == pair.source.name and r.node in readers]
        for node in readers - {r.node for r in mine}:
            mine.append(QuantRecord(node, pair.source.name, "activation", "", "", self.name))
            ctx.records.append(mine[-1])
        for record in mine:
            record.spec, record.lowering = "int8 sym per-tensor", f"Q/DQ (fused by TensorRT; {details['form']})"
            record.details = {**record.details, **details, "target": self.name}

    def _blocked_weights(self, ctx: CompileContext) -> list:
        nodes = [n for n in ctx.graph.nodes if n.op == "MatMulNBits"]
        matmuls = [lower_matmul_nbits(ctx.graph, node, ctx.names, self.name) for node in nodes]
        for record in ctx.records:
            if record.lowering == "MatMulNBits":
                record.lowering = "int4 blocked DequantizeLinear (weight-only on TensorRT)"
        ctx.graph.cleanup()
        return matmuls

    @staticmethod
    def _weight_only_inputs(ctx: CompileContext, matmuls: list) -> int:
        """An int4 weight-only GEMM reads the float activation: its input DQ is bypassed."""
        dropped = 0
        for matmul in matmuls:
            dq = matmul.inputs[0].inputs[0] if matmul.inputs[0].inputs else None
            q = dq.inputs[0].inputs[0] if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs \
                else None
            if q is None or q.op != "QuantizeLinear":
                continue
            source = q.inputs[0]
            clip = source.inputs[0] if source.inputs else None
            if clip is not None and clip.op == "Clip" and "narrows" in (getattr(clip, "doc_string", "") or ""):
                source = clip.inputs[0]
            matmul.inputs[0] = source
            dropped += 1
        ctx.graph.cleanup()
        return dropped

    def _check(self, ctx: CompileContext) -> None:
        from qcompiler.targets.tensorrt_rules import check_graph

        violations = check_graph(ctx.graph)
        if violations:
            first = violations[0]
            more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
            raise QCompileError(f"target '{self.name}': node '{first.node}' breaks TensorRT's rule "
                                f"'{first.rule}': {first.message}{more}")

    def count_kernels(self, model_path: str | os.PathLike):
        """What TensorRT would run, read from the graph: int8 GEMMs (activation and weight DQ-fed),
        int4 weight-only GEMMs and float GEMMs (no TensorRT here to ask)."""
        import onnx_graphsurgeon as gs

        from qcompiler.runtimes.ort import KernelCount
        from qcompiler.targets.tensorrt_rules import gemm_kinds

        model = onnx.load(str(model_path), load_external_data=False)
        kinds = gemm_kinds(gs.import_onnx(model))
        ops = Counter(node.op_type for node in model.graph.node)
        return KernelCount(integer_gemms=kinds["int8"], float_gemms=kinds["float"] + kinds["int4 weight-only"],
                           op_types={**dict(sorted(ops.items())), **{f"GEMM {k}": v for k, v in kinds.items()}})
