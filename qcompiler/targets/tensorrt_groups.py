"""What TensorRT cannot run, replaced by its nearest supported form: DGQ groups, per-timestep ranges, log2 attention.

DGQ channel groups (g(c) per channel c of a GEMM input X, the plan's uint8 grid (s_g, z_g) per group:
DGQ's own, or σ_g with one shared zero point where ``dgq_groups``' held-out validation chose it; each
holds 0) become one symmetric per-tensor grid and an exact per-channel affine, the symmetric form of
``lowering.channel_affine``: each group's grid moved to zero point 0 by μ_g = s_g·(128 − z_g)
(``lowering.symmetric.int8_grid`` over the range the grid covers), s = max_g s_g,
r_c = s_g(c)/s ≤ 1 and μ_c = μ_g(c),
    X' = (X − μ)/r,   q = clamp(round(X'/s), −128, 127)  (z = 0),   X̂ = r·s·q + μ,
    Σ_c X̂_c·W[c, n] + b_n = Σ_c s·q_c·W'[c, n] + b'_n,   W' = diag(r)·W (re-quantized),  b' = b + (μ/r)·Ŵ'.
b' takes μ through the re-quantized Ŵ' (``channel_affine.fold_affine``): μ is about half a group's range
and 1/r up to 41 on MiniLM, so b + μ·Ŵ left Σ_c (μ_c/r_c)·ε[c, n] (ε: W''s rounding) on every output
(one FFN GEMM 33 → 19 dB, the model's output below 0 dB).
Each group keeps the plan's 256 levels, 0 among them (q = z_g − 128), so the codes are the plan's
codes − 128 (below 8 bits: 8 bits over the plan's range; TensorRT's kernels are 8-bit); TensorRT runs one
int8 GEMM per GEMM. The affine (X − μ)/r is absorbed by a LayerNorm that writes X when the GEMMs are
its only readers, else it is an explicit Sub and Mul (pointwise ops TensorRT fuses with the Q before
the GEMM); a padded Conv reads an explicit Pad(X, 0) first, so its border still reads X = 0.
Error: DGQ's |X − X̂| ≤ s_g/2 per channel plus the re-quantization of W' (as on ORT): per output n,
|Y − X̂·W − b| ≤ Σ_c |X̂_c|·s'_w[n]/(2·r_c) (s'_w: W''s scale), with X̂ the DGQ-dequantized input.

Replaced by a near equivalent (recorded in the report's ``fallbacks`` and the records):
- token (pixel) groups and readers the affine cannot take (grouped Conv, Gemm with transA): one
  per-tensor grid over the whole calibrated range (what TensorRT expresses: per-tensor activations);
- per-timestep ranges (run-time scales from the timestep): the plan's static ranges over all timesteps;
- log2 attention (no log-domain kernel): float attention probabilities, as ``dgq`` itself leaves them;
- int4 MatMuls (weight-only on TensorRT) read the float activation: their groups are not lowered.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.folding import absorb_into_norm, along_axis
from qcompiler.grids import GroupPlan, WeightRule, quantized_gemms
from qcompiler.lowering import channel_affine as affine_ops
from qcompiler.lowering.channel_groups import Builder, affine_reason
from qcompiler.lowering.qdq import insert_tensor_qdq
from qcompiler.lowering.symmetric import int8_grid, set_inputs
from qcompiler.quant import QuantSpec, scale_zero_point

AFFINE = "symmetric per-tensor affine (one int8 GEMM)"
PER_TENSOR = "per-tensor (groups replaced)"
WEIGHT_ONLY = "float activation (int4 weight-only GEMM on TensorRT)"
LOG2 = "log2_attention"


def remove_log2_attention(ctx: CompileContext, target: str) -> int:
    """Readers of the log2 quantizer's output read the Softmax output again; returns how many were replaced."""
    made = [n for n in ctx.graph.nodes if f"/{LOG2}/" in n.name]
    if not made:
        return 0
    ours, tensors, sources = {id(n) for n in made}, ctx.graph.tensors(), set()
    for node in made:
        probabilities = tensors.get(node.name.rsplit(f"/{LOG2}/", 1)[0])
        if probabilities is None:
            continue
        for output in node.outputs:
            for reader in [r for r in output.outputs if id(r) not in ours]:
                set_inputs(reader, [probabilities if t is output else t for t in reader.inputs])
                sources.add(probabilities.name)
    for record in ctx.records:
        if record.pass_name == LOG2:
            record.lowering = f"replaced on {target}: float attention probabilities (no log-domain kernel)"
    ctx.fallbacks.append(f"{target}: log2 attention on {len(sources)} Softmax outputs replaced by float "
                         "probabilities (TensorRT has no log-domain kernel; the dgq recipe leaves them float too)")
    ctx.graph.cleanup()
    return len(sources)


def _affine_reason(node: gs.Node) -> str | None:
    """Why ``node`` cannot take the symmetric channel affine, or None."""
    return affine_reason(node, rank2_matmul_weight=True)


def lower_group_plans(ctx: CompileContext, target: str) -> str:
    """Lower every plan in ``ctx.group_plans`` for TensorRT; returns a one-line summary."""
    gemms = {node.name for node in quantized_gemms(ctx.graph)}
    counts = {AFFINE: 0, PER_TENSOR: 0, WEIGHT_ONLY: 0}
    for plan in ctx.group_plans.values():
        x = ctx.graph.tensors().get(plan.tensor)
        if x is None:
            continue
        readers = [n for n in x.outputs if n.name in gemms and n.inputs[0] is x]
        for node in [n for n in readers if n.op == "MatMulNBits"]:  # int4: weight-only on TensorRT
            _record(ctx, node, plan, WEIGHT_ONLY, target, {})
            counts[WEIGHT_ONLY] += 1
        readers = [n for n in readers if n.op != "MatMulNBits"]
        if plan.timesteps is not None:
            ctx.fallbacks.append(f"{target}: per-timestep ranges of '{x.name}' replaced by its static ranges "
                                 "(TensorRT takes constant scales only)")
            plan = replace(plan, timesteps=None, timestep_scales=None, timestep_zero_points=None)
        able = [n for n in readers if plan.axis == "channel" and _affine_reason(n) is None]
        rest = [n for n in readers if n not in able]
        if able:
            _affine(ctx, plan, x, able, target)
        if rest:
            reasons = {n.name: ("token groups are not expressible (per-tensor activations only)"
                                if plan.axis == "pixel" else _affine_reason(n)) for n in rest}
            _per_tensor(ctx, plan, x, rest, target, reasons)
        counts[AFFINE] += len(able)
        counts[PER_TENSOR] += len(rest)
    ctx.graph.cleanup().toposort()
    return "DGQ groups: " + ", ".join(f"{n} GEMMs {kind}" for kind, n in counts.items())


def _record(ctx: CompileContext, node: gs.Node, plan: GroupPlan, lowering: str, target: str, details: dict) -> None:
    spec = QuantSpec(bits=8, symmetric=True, granularity="groups", axis=plan.channel_axis)
    ctx.records.append(QuantRecord(node.name, plan.tensor, "activation", spec.describe(), lowering, target,
                                   {**plan.details(), **details}))


def _per_tensor(ctx: CompileContext, plan: GroupPlan, x: gs.Tensor, readers: list[gs.Node], target: str,
                reasons: dict) -> None:
    """One asymmetric per-tensor grid over the groups' union range (made symmetric with the other activations)."""
    low, high = float(plan.group_min.min()), float(plan.group_max.max())
    spec = QuantSpec(bits=8, symmetric=False)
    scale, zero_point = scale_zero_point(low, high, spec)
    why = f"qcompile {target}: DGQ groups of '{x.name}' replaced by one per-tensor grid over [{low:.6g}, {high:.6g}]"
    insert_tensor_qdq(ctx, x, readers, float(scale), int(zero_point), spec, target, why, output_side=False)
    for node in readers:
        ctx.fallbacks.append(f"{target}: '{x.name}' → {node.name}: DGQ {plan.axis} groups replaced by one per-tensor "
                             f"grid ({reasons[node.name]})")
        _record(ctx, node, plan, PER_TENSOR, target, {"reason": reasons[node.name]})


def _affine(ctx: CompileContext, plan: GroupPlan, x: gs.Tensor, able: list[gs.Node], target: str) -> None:
    # The plan's own grids (the pass decides them: DGQ's per-group zero points, or the one shared zero
    # point and wider σ_g that held-out validation chose), each over the range it covers, 0 included.
    # Not grids re-fitted to the calibrated group ranges: held-out rows exceed those, and on MiniLM
    # clipping at them (75× more often than at σ_g) cost 1 dB of output SQNR against the ORT target.
    spec = plan.spec
    scales, zero_points = plan.scales.astype(np.float64), plan.zero_points.astype(np.float64)
    group_scale, centre = int8_grid(scales * (spec.qmin - zero_points), scales * (spec.qmax - zero_points))
    scale = float(group_scale.max())
    ratio, shift = group_scale[plan.labels] / scale, centre[plan.labels]
    b = Builder(ctx, target, x.name, f"DGQ channel groups (K={plan.groups}) of '{x.name}' as one symmetric grid "
                                     "and an exact per-channel affine")
    sources: dict = {}
    for node in able:
        rule = ctx.weight_rules.get(node.name) or WeightRule(ctx.settings.wbits)
        # Bias correction of the re-quantized weight's mean error, as the ORT target does (same plan).
        affine_ops.fold_affine(b, node, ratio, shift, rule, plan.channel_mean)
        pads = affine_ops.conv_padding(node) if node.op == "Conv" else None
        key = tuple(pads or ())
        if key not in sources:
            sources[key] = _codes(ctx, b, x, able, node, pads, ratio, shift, scale)
        if pads:
            node.attrs["pads"] = [0] * len(node.attrs["pads"])
        node.inputs[0] = sources[key][0]
        _record(ctx, node, plan, AFFINE, target, {"scale": scale, "zero_point": 0, "affine": sources[key][1],
                                                  "ratio_min": float(ratio.min())})


def _codes(ctx, b: Builder, x: gs.Tensor, able: list[gs.Node], node: gs.Node, pads, ratio, shift, scale: float):
    """(DequantizeLinear output, how X' is made) for the readers with this padding."""
    absorbed = None
    if node.op != "Conv":
        absorbed = absorb_into_norm(ctx, x, able, ratio, shift, b.pass_name)
    if absorbed:
        source, how = x, f"absorbed by {absorbed}"
    else:
        rank, axis = (4, 1) if node.op == "Conv" else (len(x.shape) if x.shape else 3, -1)
        source = affine_ops.pad_input(b, x, pads) if pads else x
        source = b.op("Sub", [source, along_axis(shift.astype(np.float32), axis, rank)], np.float32)
        source = b.op("Mul", [source, along_axis((1.0 / ratio).astype(np.float32), axis, rank)], np.float32)
        how = "explicit Sub + Mul" + (" after Pad" if pads else "")
        ctx.fallbacks.append(f"{b.pass_name}: '{x.name}' shifted and scaled per channel ({how}) before one "
                             "symmetric QuantizeLinear (DGQ channel affine); no LayerNorm could absorb it")
    q = b.op("QuantizeLinear", [source, np.array(scale, np.float32), np.array(0, np.int8)], np.int8)
    return b.op("DequantizeLinear", [q, np.array(scale, np.float32), np.array(0, np.int8)], np.float32), how
