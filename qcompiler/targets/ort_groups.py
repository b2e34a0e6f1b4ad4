"""DGQ group plans on ONNX Runtime: which lowering each (plan, GEMM) pair gets, and the records.

Per GEMM input X with a plan (group g(i) per index, (s_g, z_g)); ``mode`` picks the channel-group form:
- "affine" (default): DGQ's codes under one per-tensor grid, the affine folded into W and b
  (``lowering.channel_affine``): one MatMulIntegerToFloat / QLinearConv / QGemm / MatMulNBits per GEMM.
  Token (pixel) groups of a MatMul take the row form of the same affine in every mode.
- "split": K partial integer GEMMs on the channel slices of each group, summed in float
  (MatMulIntegerToFloat; ConvInteger for Conv): the bit-exact reference, K kernels per GEMM.
- "fold": one shared zero point, group ratios folded into W (``lowering.channel_groups``; approximate).
- "simulate": per-index QDQ before a float GEMM on the constant Ŵ (accuracy sweeps; no integer kernel).
Per-timestep and TDQ tables (run-time scales gathered by the timestep) take integer GEMMs rescaled
after the kernel (``lowering.timestep_integer``; "simulate" there: fake quantization before float GEMMs).
Whatever a mode cannot take (Conv pixel groups, grouped or auto-padded Convs) is simulated and its
record says why. Every path keeps the activation error |X − X̂| ≤ s_g/2
inside the calibrated range (fold: σ_g ≥ s_g); "affine" adds the re-quantization of W' = diag(r)·Ŵ.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.errors import PassError
from qcompiler.folding import absorb_into_norm, norm_absorber
from qcompiler.grids import GroupPlan, WeightRule, quantized_gemms
from qcompiler.lowering import channel_affine as affine_ops
from qcompiler.lowering import timestep_integer
from qcompiler.lowering.channel_groups import (
    affine_reason,
    Builder,
    conv_split_reason,
    dequantized_weight,
    fold_activation,
    linear_weight,
    lower_conv_split,
    lower_linear_fold,
    lower_linear_split,
    quantize_channel_groups,
    weight_dq,
)
from qcompiler.quant import QuantSpec
from qcompiler.skeleton import fresh_map

AFFINE = "per-tensor affine (DGQ codes, one integer GEMM)"
ROWS = "row-scaled integer GEMM"
SPLIT = "K-split integer GEMMs"
FOLD = "fold into W"
SIMULATED = "simulated"
CHANNEL_GROUP_MODES = ("affine", "split", "fold", "simulate")
TIMESTEP_GROUP_MODES = timestep_integer.MODES


def affine_run_time_ops(ctx: CompileContext, x: gs.Tensor, shared_zero_point: bool, bias_correction: bool) -> int:
    """Elementwise ops the affine lowering adds at run time for channel groups of ``x``.

    Mirrors ``GroupLowering._affine_codes`` and ``fold_affine``: the codes cost nothing where a Norm
    producer takes (x − δ)/r for MatMul/Gemm readers, else a Div, plus an Add for free zero points,
    plus a Pad before a padded Conv (free zero points: δ ≠ 0 moves the padding out of the Conv);
    each reader with no bias to fold into gets a bias Add when δ ≠ 0 or the bias is corrected."""
    readers = [n for n in x.outputs if n.op not in ("Shape", "Size")]
    convs = [n for n in readers if n.op == "Conv"]
    absorbable = (not convs and readers and all(affine_reason(n) is None for n in readers) and x.shape
                  and isinstance(x.shape[-1], int) and norm_absorber(ctx, x, readers, x.shape[-1]) is not None)
    if absorbable:
        codes = 0
    elif shared_zero_point:
        codes = 1
    else:
        codes = 2 + int(any(affine_ops.conv_padding(n) for n in convs))
    if shared_zero_point and not bias_correction:
        return codes
    return codes + sum(not affine_ops.takes_output_bias(ctx.graph, n, _output_channels(n)) for n in readers)


def _output_channels(node: gs.Node) -> int:
    """N of a GEMM whose weight is a constant or a DequantizeLinear of one (0 where unknown)."""
    if node.op == "MatMulNBits":
        return int(node.attrs["N"])
    weight = node.inputs[1]
    if weight.inputs and weight.inputs[0].op == "DequantizeLinear":
        weight = weight.inputs[0].inputs[0]
    shape = getattr(weight, "shape", None)
    if not shape:
        return 0
    if node.op == "Conv":
        return int(shape[0])
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return int(shape[0])
    return int(shape[-1])


def lower_group_plans(ctx: CompileContext, mode: str, target: str, bias_correction: bool = False,
                      timestep_mode: str = "auto") -> str:
    """Lower every plan in ``ctx.group_plans``; returns a one-line summary of the lowerings used.

    ``timestep_mode`` lowers per-timestep and TDQ tables: "integer" (``lowering.timestep_integer``),
    "simulate" (fake quantization with gathered scales before float GEMMs) or "auto" (integer where
    that is faster on ORT's CPU: ``timestep_integer.cost_reason``)."""
    if ctx.graph.opset < 13:
        raise PassError(f"target '{target}': DGQ groups need opset ≥ 13 for per-axis QuantizeLinear; "
                        f"the model has opset {ctx.graph.opset}")
    lowering = GroupLowering(ctx, mode, target, bias_correction, timestep_mode)
    gemm_names = {node.name for node in quantized_gemms(ctx.graph)}
    counts: Counter = Counter()
    notes = []
    for plan in ctx.group_plans.values():
        x = ctx.graph.tensors().get(plan.tensor)
        if x is None:
            notes.append(f"planned tensor '{plan.tensor}' is gone from the graph; not lowered")
            continue
        readers = [n for n in x.outputs if n.name in gemm_names]
        for node, (kind, details) in lowering.lower(plan, x, readers):
            spec = QuantSpec(bits=plan.bits, granularity="groups", axis=_axis(plan))
            if plan.bits < 8:  # codes clamped to 2^b levels in a uint8 container, as insert_activation_qdq does
                details = {**details, "narrowed_container": True}
            ctx.records.append(QuantRecord(node.name, plan.tensor, "activation", spec.describe(), kind, target,
                                           {**plan.details(), **details}))
            counts[kind] += 1
    ctx.graph.cleanup().toposort()
    return "DGQ groups: " + (", ".join(f"{n} × {k}" for k, n in counts.items()) or "nothing lowered") + \
        ("; " + "; ".join(notes) if notes else "")


def _axis(plan: GroupPlan) -> int:
    """The axis the group scales run along in the lowered graph (pixels of a Conv: flattened to 2)."""
    return plan.channel_axis if plan.axis == "channel" else (2 if plan.channel_axis == 1 else 1)


class GroupLowering:
    """Lowers one plan for all the GEMMs that read its tensor; pieces they share are built once."""

    def __init__(self, ctx: CompileContext, mode: str, target: str, bias_correction: bool = False,
                 timestep_mode: str = "auto"):
        self.ctx, self.mode, self.target, self.timestep_mode = ctx, mode, target, timestep_mode
        self.bias_correction = bias_correction

    def lower(self, plan: GroupPlan, x: gs.Tensor, readers: list[gs.Node]) -> list[tuple[gs.Node, tuple[str, dict]]]:
        why = (f"DGQ {plan.axis} groups (K={plan.groups}, D_channel={plan.d_channel:.4g}, "
               f"D_pixel={plan.d_pixel:.4g}) of '{x.name}'")
        b = Builder(self.ctx, self.target, x.name, why)
        shared: dict = {}
        if plan.timesteps is not None:
            return [(node, self._per_timestep(b, plan, x, node, shared)) for node in readers]
        if plan.axis == "pixel":
            return [(node, self._pixels(b, plan, x, node, shared)) for node in readers]
        if self.mode == "affine":
            return self._affine_channels(b, plan, x, readers)
        return [(node, self._channels(b, plan, x, node, shared)) for node in readers]

    # -- affine (default) -------------------------------------------------------------------------
    def _affine_reason(self, node: gs.Node) -> str | None:
        return affine_reason(node)

    def _affine_channels(self, b: Builder, plan: GroupPlan, x: gs.Tensor, readers: list[gs.Node]):
        affine = affine_ops.group_affine(plan)
        results, able, simulated = [], [], {}
        for node in readers:
            reason = self._affine_reason(node)
            if reason is None:
                able.append(node)
            else:
                results.append((node, self._simulate(b, plan, x, node, simulated, reason)))
        codes: dict = {}
        for node in able:
            source = self._affine_codes(b, plan, x, node, affine, able, codes)
            mean = plan.channel_mean if self.bias_correction else None
            affine_ops.fold_affine(b, node, affine.ratio, affine.shift, self._rule(node), mean)
            self._release_source(node)
            if node.op == "Conv" and affine_ops.conv_padding(node) and not affine.shared_zero_point:
                node.attrs["pads"] = [0] * len(node.attrs["pads"])
            node.inputs[0] = source[0]
            results.append((node, (AFFINE, {"kernel": _kernel(node), "codes": source[1], "scale": float(affine.scale),
                                      "zero_point": affine.zero_point, "ratio_min": float(affine.ratio.min())})))
        return results

    def _affine_codes(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, affine, able, codes: dict):
        """(DequantizeLinear output, how its codes are made), shared by readers with the same padding."""
        shared = affine.shared_zero_point  # δ = 0: zero padding stays exact, no Add
        pads = affine_ops.conv_padding(node) if node.op == "Conv" and not shared else None
        key = tuple(pads or ())
        if key in codes:
            return codes[key]
        spec = plan.spec
        if node.op == "Conv" and shared:
            q, how = affine_ops.codes_divided(b, x, affine, 1, 4, spec), "Div (shared zero point)"
        elif node.op == "Conv":
            source = affine_ops.pad_input(b, x, pads) if pads else x
            # Not a per-axis QuantizeLinear: ORT moves QLinearConv to NHWC, the channel axis becomes the
            # innermost one, and per-axis Q runs element by element there (see lowering.channel_affine).
            q, how = affine_ops.codes_scaled(b, source, affine, 1, 4, spec), "Div + Add"
        else:
            absorbed = None
            if len(able) == len([n for n in x.outputs if n.op not in ("Shape", "Size")]):
                absorbed = absorb_into_norm(self.ctx, x, able, affine.ratio, affine.shift, self.target)
            if absorbed:
                q, how = affine_ops.codes_per_tensor(b, x, affine, spec), f"absorbed by {absorbed}"
            else:
                rank = len(x.shape) if x.shape else 3
                ops = "Div" if shared else "Div + Add"
                q = (affine_ops.codes_divided if shared else affine_ops.codes_scaled)(b, x, affine, rank - 1, rank, spec)
                how = f"{ops} (explicit)"
                self.ctx.fallbacks.append(f"{self.target}: '{x.name}' scaled per channel ({ops}) before one "
                                          "per-tensor QuantizeLinear (DGQ channel affine); no Norm could absorb it")
        codes[key] = (affine_ops.dequantize(b, q, affine), how)
        return codes[key]

    def _rule(self, node: gs.Node) -> WeightRule:
        rule = self.ctx.weight_rules.get(node.name)
        if rule is None:  # a weight quantized outside quantize_weights: min/max at the compile's width
            rule = WeightRule(self.ctx.settings.wbits)
        return rule

    def _release_source(self, node: gs.Node) -> None:
        """The float weight was read once more; a fresh map drops its pages from the resident set."""
        rule = self.ctx.weight_rules.get(node.name)
        if rule is not None and rule.source is not None:
            self.ctx.weight_rules[node.name] = replace(rule, source=fresh_map(rule.source))

    # -- token (pixel) groups ---------------------------------------------------------------------
    def _pixels(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict):
        rank = len(x.shape) if x.shape else 0
        reason = None
        if node.op not in ("MatMul", "MatMulNBits") or rank != 3:
            reason = f"{node.op} with a rank-{rank} input has no row-scaled GEMM"
        elif node.op == "MatMul" and self._affine_reason(node):
            reason = self._affine_reason(node)
        if reason:
            return self._simulate(b, plan, x, node, shared, reason)
        tokens = plan.labels.size
        if x.shape[1] != tokens:
            raise PassError(f"target '{self.target}': '{x.name}' has shape {x.shape}; its per-token scales need "
                            f"a static token axis of length {tokens} (the calibration's sequence length)")
        affine = affine_ops.group_affine(plan)
        if "rows" not in shared:
            shared["rows"] = affine_ops.dequantize(b, affine_ops.codes_per_axis(b, x, affine, 1, plan.spec), affine)
        affine_ops.scale_rows(b, node, affine, tokens)
        node.inputs[0] = shared["rows"]
        return ROWS, {"kernel": _kernel(node), "scale": float(affine.scale), "zero_point": affine.zero_point}

    # -- split / fold / simulate (comparison modes) -------------------------------------------------
    def _channels(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict):
        if self.mode == "simulate":
            return self._simulate(b, plan, x, node, shared, "channel_groups='simulate' was asked for")
        if node.op == "MatMulNBits":
            return self._simulate(b, plan, x, node, shared, "int4 weights: MatMulNBits re-quantizes its input "
                                                            "per block at run time")
        if node.op == "Conv":
            reason = conv_split_reason(node)
            if reason is not None:
                return self._simulate(b, plan, x, node, shared, reason)
            lower_conv_split(b, node, plan, self._parts(b, plan, x, shared))
            return SPLIT, {"kernel": "ConvInteger"}
        weight = linear_weight(node)
        if isinstance(weight, str):
            return self._simulate(b, plan, x, node, shared, weight)
        if self.mode == "fold":
            if "fold" not in shared:
                shared["fold"] = fold_activation(b, plan)
                self.ctx.fallbacks.append(f"{self.target}: '{x.name}' divided by its channels' group scales (Div) "
                                          "before one per-tensor QuantizeLinear (fold into W)")
            lower_linear_fold(b, node, weight, *shared["fold"], self.ctx.settings.wbits)
            return FOLD, {"kernel": "MatMulIntegerToFloat", "rho_min": float(shared["fold"][1].min())}
        lower_linear_split(b, node, weight, plan, self._parts(b, plan, x, shared))
        return SPLIT, {"kernel": "MatMulIntegerToFloat"}

    @staticmethod
    def _parts(b: Builder, plan: GroupPlan, x: gs.Tensor, shared: dict):
        if "parts" not in shared:
            shared["parts"] = quantize_channel_groups(b, plan, x)
        return shared["parts"]

    def _simulate(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict, reason: str):
        """Per-index QDQ (fake quantization) into a float GEMM on the constant Ŵ (MatMulNBits: kept)."""
        if "simulated" not in shared:
            shared["simulated"] = _simulated_qdq(b, plan, x)
        return SIMULATED, {**_read_fake_quantized(b, x, node, shared["simulated"]), "reason": reason}

    def _per_timestep(self, b: Builder, plan: GroupPlan, x: gs.Tensor, node: gs.Node, shared: dict):
        """Each row's tabled (s, z) at its timestep: integer GEMMs rescaled after the kernel
        (``lowering.timestep_integer``), or fake quantization before a float GEMM on Ŵ."""
        from qcompiler.lowering.timestep_ranges import LOWERING, TDQ_LOWERING, simulated_timestep_qdq

        timestep = next(i for i in self.ctx.graph.inputs if i.name == plan.timestep_input)
        extra = {"timesteps": int(plan.timesteps.size)}
        if self.timestep_mode == "simulate":
            reason = "timestep_groups='simulate' was asked for"
        else:
            reason = timestep_integer.integer_reason(plan, x, node)
            if reason is None and self.timestep_mode == "auto":
                reason = timestep_integer.cost_reason(plan, node)
        if reason is None:
            if "timestep_codes" not in shared:
                shared["timestep_codes"] = timestep_integer.TimestepCodes(b, plan, x, timestep)
            lower = timestep_integer.lower_conv if node.op == "Conv" else timestep_integer.lower_linear
            details = lower(shared["timestep_codes"], node)
            method = "TDQ" if plan.timestep_method == "tdq" else "per-timestep"
            return f"{timestep_integer.INTEGER} ({method})", {**details, **extra}
        if "per_timestep" not in shared:
            shared["per_timestep"] = simulated_timestep_qdq(b, x, timestep, plan)
        details = _read_fake_quantized(b, x, node, shared["per_timestep"])
        kind = TDQ_LOWERING if plan.timestep_method == "tdq" else LOWERING
        return kind, {**details, **extra, "reason": reason}


def _kernel(node: gs.Node) -> str:
    return {"MatMul": "MatMulIntegerToFloat", "Conv": "QLinearConv", "Gemm": "QGemm"}.get(node.op, node.op)


def _read_fake_quantized(b: Builder, x: gs.Tensor, node: gs.Node, x_hat: gs.Tensor) -> dict:
    """Point ``node`` at X̂ instead of X and give it Ŵ as Cast(W_q) · s_w (MatMulNBits keeps its kernel).

    Not the weight's DequantizeLinear: ORT would fuse a per-axis activation DQ → MatMul into
    MatMulIntegerToFloat, which then fails at run time (it takes a scalar activation zero point),
    turns DQ → MatMul into MatMulNBits (re-quantizing X̂ at run time), and runs a DQ left before a
    Conv at every call, which also keeps the Conv out of its NCHWc layout. Cast and Mul of constants
    are folded by ORT when the session loads, so it computes on the float Ŵ while the file keeps
    the int8 values (bench_timestep_lowering.py, zoo UNet one-group lookup: 8.43 MB with float Ŵ, 3.46 MB so)."""
    for index, value in enumerate(node.inputs):
        if value is x:
            node.inputs[index] = x_hat
    if node.op != "MatMulNBits":
        node.inputs[1] = _weight_folded_at_load(b, node)
    return {"kernel": f"float {node.op}" if node.op != "MatMulNBits" else "MatMulNBits"}


def _weight_folded_at_load(b: Builder, node: gs.Node) -> gs.Tensor:
    """Cast(W_q) · s_w, the weight DequantizeLinear's numbers bit for bit (zero point 0), else the constant Ŵ."""
    found = weight_dq(node)
    if found is None or found[0].dtype != np.int8:
        return b.const("dequantized_weight", dequantized_weight(node))
    values, scale, axis = found
    shape = [1] * values.ndim
    shape[axis] = scale.size
    as_float = b.op("Cast", [values], np.float32, attrs={"to": onnx.TensorProto.FLOAT})
    return b.op("Mul", [as_float, scale.astype(np.float32).reshape(shape)], np.float32)


def _simulated_qdq(b: Builder, plan: GroupPlan, x: gs.Tensor) -> gs.Tensor:
    scale, zero_point = plan.element_scale().astype(np.float32), plan.element_zero_point()
    view, axis = x, _axis(plan)
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
