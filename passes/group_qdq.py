"""Pass ``insert_group_qdq`` (DGQ lowering): replace the per-tensor activation QDQ by the planned groups.

Rewrites, for each GEMM input X with a ``dgq_groups`` plan (group g(i) per index, (s_g, z_g)):
- pixel (token) groups on a MatMul with int8 weights ("MatMulInteger per-row"):
      X_q = QuantizeLinear(X, s[t], z[t], axis=1)                        (per-token vectors)
      Y = Cast(MatMulInteger(X_q, W_q) − z[t]·Σ_k W_q[k, n]) · s[t]·s_w[n]
  The int32 correction is exact: Σ_k (X_q[t,k] − z[t])·W_q[k,n] = (X_q·W_q)[t,n] − z[t]·colsum(W_q)[n].
  (ORT's MatMulInteger accepts only a scalar activation zero point, hence the correction.)
- channel groups (the reduction axis) on MatMul/Gemm and Conv ("K-split integer GEMMs"): K partial
  integer GEMMs on the channel slices of each group, summed in float (``group_lowering``);
  or, with ``channel_groups="fold"``, one GEMM with the group ratios folded into W ("fold into W").
- anything else ("simulated"): QuantizeLinear/DequantizeLinear with the full-length per-index
  vector (a Reshape first when the pixels span two axes), before a float GEMM on Ŵ. The weight
  becomes the constant Ŵ because ORT would fuse a per-axis activation DQ → MatMul into
  MatMulIntegerToFloat, which then fails at run time (it takes a scalar activation zero point).
  MatMulNBits (W4) keeps its kernel and reads the group QDQ: it re-quantizes its input per block.
Every path reproduces ``quant.fake_quantize`` with the plan's parameters (fold: σ_g and a shared
z, see ``group_lowering``), so the activation error is |X − X̂| ≤ s_g/2 inside the calibrated range.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from qcompiler.passes.dgq_groups import GroupPlan, group_plans
from qcompiler.passes.group_lowering import (
    Builder,
    LinearWeight,
    conv_split_reason,
    dequantized_weight,
    fold_activation,
    linear_weight,
    lower_conv_split,
    lower_linear_fold,
    lower_linear_split,
    quantize_channel_groups,
)
from qcompiler.passes.insert_activation_qdq import quantized_gemms

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.errors import PassError
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.quant import QuantSpec

ROWS = "MatMulInteger per-row"
SPLIT = "K-split integer GEMMs"
FOLD = "fold into W"
SIMULATED = "simulated"


@dataclass(frozen=True)
class InsertGroupQDQConfig:
    #: "split": K integer GEMMs, exact; "fold": one GEMM, group ratios in W; "simulate": per-channel
    #: QDQ before a float GEMM on Ŵ (the same numbers as "split" to float rounding, for fast
    #: accuracy sweeps; nothing runs on an integer kernel and the report says so).
    channel_groups: str = "split"

    def __post_init__(self):
        if self.channel_groups not in ("split", "fold", "simulate"):
            raise ValueError(f"InsertGroupQDQConfig: channel_groups must be 'split', 'fold' or 'simulate', "
                             f"got {self.channel_groups!r}")


class InsertGroupQDQ(Pass):
    """Lowers each DGQ group plan onto ORT integer kernels where the math allows; see the module doc."""

    name = "insert_group_qdq"
    Config = InsertGroupQDQConfig

    def requires(self, ctx: CompileContext) -> None:
        if group_plans(ctx) is None:
            raise PassError(f"pass '{self.name}' lowers the plans of 'dgq_groups'; run dgq_groups before it")
        if ctx.graph.opset < 13:
            raise PassError(f"pass '{self.name}' needs opset ≥ 13 for per-axis QuantizeLinear; "
                            f"the model has opset {ctx.graph.opset}")

    def call(self, ctx: CompileContext) -> PassResult:
        gemm_names = {node.name for node in quantized_gemms(ctx.graph)}
        tensors = ctx.graph.tensors()
        counts: Counter = Counter()
        notes = []
        for plan in group_plans(ctx).values():
            x = tensors.get(plan.tensor)
            if x is None:
                notes.append(f"planned tensor '{plan.tensor}' is gone from the graph; not lowered")
                continue
            shared: dict = {}  # pieces every consumer of X reads: one Q (+ Split) per tensor
            for node in [n for n in x.outputs if n.name in gemm_names]:
                lowering, details = self._lower(ctx, plan, x, node, shared)
                spec = QuantSpec(bits=plan.bits, granularity="groups", axis=self._axis(plan))
                ctx.records.append(QuantRecord(node.name, plan.tensor, "activation", spec.describe(), lowering,
                                               self.name, {**plan.details(), **details}))
                counts[lowering] += 1
        ctx.graph.cleanup().toposort()
        summary = ", ".join(f"{n} × {k}" for k, n in counts.items()) or "nothing lowered"
        return PassResult(bool(counts), (summary, *notes))

    @staticmethod
    def _axis(plan: GroupPlan) -> int:
        """The axis the group scales run along in the lowered graph (pixels of a Conv: flattened to 2)."""
        return plan.channel_axis if plan.axis == "channel" else (2 if plan.channel_axis == 1 else 1)

    def _lower(self, ctx: CompileContext, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict):
        why = (f"DGQ {plan.axis} groups (K={plan.groups}, D_channel={plan.d_channel:.4g}, "
               f"D_pixel={plan.d_pixel:.4g}) of '{x.name}' for {node.op} '{node.name}'")
        b = Builder(ctx, self.name, x.name, why)
        if plan.timesteps is not None:
            return self._per_timestep(b, plan, x, node, shared)
        if node.op == "MatMulNBits":
            return self._simulate(b, plan, x, node, shared, "int4 weights: MatMulNBits re-quantizes its input "
                                                            "per block at run time")
        weight = linear_weight(node) if node.op in ("MatMul", "Gemm") else None
        if plan.axis == "pixel":
            rank = len(x.shape) if x.shape else 0
            if node.op == "MatMul" and isinstance(weight, LinearWeight) and rank == 3:
                self._rows(b, plan, x, node, weight, shared)
                return ROWS, {"kernel": "MatMulInteger"}
            reason = weight if isinstance(weight, str) else f"{node.op} with a rank-{rank} input has no per-row GEMM"
            return self._simulate(b, plan, x, node, shared, reason)
        if self.config.channel_groups == "simulate":
            return self._simulate(b, plan, x, node, shared, "channel_groups='simulate' was asked for")
        if node.op == "Conv":
            reason = conv_split_reason(node)
            if reason is not None:
                return self._simulate(b, plan, x, node, shared, reason)
            lower_conv_split(b, node, plan, self._parts(b, plan, x, shared))
            return SPLIT, {"kernel": "ConvInteger"}
        if isinstance(weight, str):
            return self._simulate(b, plan, x, node, shared, weight)
        if self.config.channel_groups == "fold":
            if "fold" not in shared:
                shared["fold"] = fold_activation(b, plan)
                ctx.fallbacks.append(f"{self.name}: '{x.name}' divided by its channels' group scales (Div) "
                                     "before one per-tensor QuantizeLinear (fold into W)")
            lower_linear_fold(b, node, weight, *shared["fold"], ctx.settings.wbits)
            return FOLD, {"kernel": "MatMulIntegerToFloat", "rho_min": float(shared["fold"][1].min())}
        lower_linear_split(b, node, weight, plan, self._parts(b, plan, x, shared))
        return SPLIT, {"kernel": "MatMulIntegerToFloat"}

    @staticmethod
    def _parts(b: Builder, plan: GroupPlan, x: gs.Tensor, shared: dict):
        if "parts" not in shared:
            shared["parts"] = quantize_channel_groups(b, plan, x)
        return shared["parts"]

    def _rows(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, weight: LinearWeight,
              shared: dict) -> None:
        """MatMulInteger(X_q, W_q) − z[t]·colsum(W_q) in int32, then · s[t]·s_w[n] in float."""
        tokens = plan.labels.size
        if x.shape[1] != tokens:
            raise PassError(f"pass '{self.name}': '{x.name}' has shape {x.shape}; its per-token scales need "
                            f"a static token axis of length {tokens} (the calibration's sequence length)")
        scale = plan.element_scale().reshape(tokens, 1).astype(np.float32)
        zero_point = plan.element_zero_point()
        if "rows" not in shared:
            quantized = b.op("QuantizeLinear", [x, scale.reshape(-1), zero_point], np.uint8, attrs={"axis": 1})
            shared["rows"] = b.narrow(quantized, plan.spec)
        output = node.outputs[0]
        node.outputs.clear()
        product = b.op("MatMulInteger", [shared["rows"], weight.values], np.int32)
        column_sums = weight.values.astype(np.int32).sum(axis=0, dtype=np.int32)
        correction = b.op("Mul", [zero_point.astype(np.int32).reshape(tokens, 1), column_sums], np.int32)
        exact = b.cast_float(b.op("Sub", [product, correction], np.int32))
        rescale = b.op("Mul", [scale, weight.scale], np.float32)
        b.op("Mul", [exact, rescale], np.float32, outputs=[output])

    def _simulate(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict, reason: str):
        """Per-index QDQ (fake quantization) into a float GEMM on the constant Ŵ (MatMulNBits: kept)."""
        if "simulated" not in shared:
            shared["simulated"] = self._simulated_qdq(b, plan, x)
        return SIMULATED, {**self._read_fake_quantized(b, x, node, shared["simulated"]), "reason": reason}

    @staticmethod
    def _read_fake_quantized(b: Builder, x: gs.Tensor, node: gs.Node, x_hat: gs.Tensor) -> dict:
        """Point ``node`` at X̂ instead of X and give it the constant Ŵ (MatMulNBits keeps its kernel)."""
        for index, value in enumerate(node.inputs):
            if value is x:
                node.inputs[index] = x_hat
        if node.op != "MatMulNBits":
            node.inputs[1] = b.const("dequantized_weight", dequantized_weight(node))
        return {"kernel": f"float {node.op}" if node.op != "MatMulNBits" else "MatMulNBits"}

    def _per_timestep(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict):
        """Run-time (s, z) of each row's nearest calibrated timestep before a float GEMM on Ŵ."""
        from qcompiler.passes.timestep_ranges import LOWERING, simulated_timestep_qdq

        if "per_timestep" not in shared:
            timestep = next(i for i in b.ctx.graph.inputs if i.name == plan.timestep_input)
            shared["per_timestep"] = simulated_timestep_qdq(b, x, timestep, plan)
        details = self._read_fake_quantized(b, x, node, shared["per_timestep"])
        return LOWERING, {**details, "timesteps": int(plan.timesteps.size)}

    def _simulated_qdq(self, b: Builder, plan: GroupPlan, x: gs.Tensor) -> gs.Tensor:
        scale, zero_point = plan.element_scale().astype(np.float32), plan.element_zero_point()
        view, axis = x, self._axis(plan)
        flatten = plan.axis == "pixel" and (plan.channel_axis == 1 or len(x.shape) != 3)
        if flatten:  # pixels span several axes: (N, C, H·W) for Conv, (N, P, C) for Linear
            shape = [0, 0, -1] if plan.channel_axis == 1 else [0, plan.labels.size, -1]
            view = b.op("Reshape", [x, np.array(shape, np.int64)], np.float32)
        quantized = b.narrow(b.op("QuantizeLinear", [view, scale, zero_point], np.uint8, attrs={"axis": axis}),
                             plan.spec)
        dequantized = b.op("DequantizeLinear", [quantized, scale, zero_point], np.float32, attrs={"axis": axis})
        if not flatten:
            return dequantized
        return b.op("Reshape", [dequantized, b.op("Shape", [x], np.int64)], np.float32)
