"""Q-DiT's group-wise GEMM: activations quantized per token and input-channel group at run time, one integer
GEMM whose int32 partial sums per group get the run-time scales.

For a Linear Y = X·W (+ b), X of shape (..., K), groups of g input channels (G = K/g):
    activations, per row m and group k (dynamic, asymmetric, ``abits``):
        lo = min(0, min X[m, k·g:(k+1)·g]),  hi = max(0, max …),  s = max((hi − lo)/q_max, ε),
        z = clamp(round(−lo/s), 0, q_max),  q = clamp(round(X/s) + z, 0, q_max)          (uint8)
    weights, per group k and column n (symmetric, ``wbits``): s_w = max|W[k·g:(k+1)·g, n]|/q_w,
        W_q = clamp(round(W/s_w), −q_w, q_w)                                             (int8)
    Y[m, n] = Σ_k s[m, k]·( s_w[k, n]·I[m, k, n] ) − Σ_k (s·z)[m, k]·D[k, n],
        I[m, k, n] = Σ_j q[m, k·g+j]·W_q[k·g+j, n],   D[k, n] = s_w[k, n]·Σ_j W_q[k·g+j, n]
"integer" (default): s_w·I is one MatMulIntegerToFloat (ORT's integer GEMM with a per-column output
scale) of the codes (M, K) with a block-diagonal int8 weight (K, G·N) whose block k holds W_q's rows
of group k (uint8 × int8 → exact int32 sums); the first sum is then a batched float MatMul
(M, 1, G)·(M, G, N), the zero-point term a float (M, G)·(G, N) GEMM. The run-time scales differ per token *and* group, so the G partial sums cannot share one
accumulator: the integer GEMM writes G·N sums per row instead of N, and that output (not the
multiply-adds) is what costs time on ORT's CPU (benchmarks/results/dit_recipes.md). ``static``
(one calibrated (s, z) per group, the ablation of dynamic ranges) folds s into s_w and the
zero-point term into the bias. "simulate": X̂ = (q − z)·s in float, then one float MatMul with
Ŵ = W_q·s_w (the same numbers, no integer kernel; faster at the zoo DiT's widths; labelled simulated).
Equal, to float32 rounding, to ``reference`` below (the numpy simulation the passes and tests use).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.graph import constant_value
from qcompiler.grids import DynamicGroupPlan
from qcompiler.lowering.channel_groups import Builder
from qcompiler.patterns import match_linear, weight_array
from qcompiler.quant import MIN_SCALE

MODES = ("integer", "simulate")
INTEGER = "one MatMulIntegerToFloat (block-diagonal over groups), run-time scales on its sums"
SIMULATED = "simulated (per-token-group fake quantization, float MatMul)"


def activation_params(x: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(s, z) per row and group of x (M, K), each (M, G, 1), in float32 as the graph computes them."""
    rows = x.astype(np.float32).reshape(x.shape[0], -1, group)
    low = np.minimum(rows.min(axis=-1, keepdims=True), np.float32(0))
    high = np.maximum(rows.max(axis=-1, keepdims=True), np.float32(0))
    scale = np.maximum((high - low) / np.float32(2**bits - 1), np.float32(MIN_SCALE))
    return scale, np.clip(np.rint(-low / scale), 0, 2**bits - 1).astype(np.float32)


def group_weight(weight: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_q (G, g, N) int8, s_w (G, 1, N) float32) of a [K, N] weight, symmetric per group and column."""
    limit = 2 ** (bits - 1) - 1
    blocks = weight.astype(np.float32).reshape(-1, group, weight.shape[1])
    scale = np.maximum(np.abs(blocks).max(axis=1, keepdims=True) / np.float32(limit), np.float32(MIN_SCALE))
    return np.clip(np.rint(blocks / scale), -limit, limit).astype(np.int8), scale.astype(np.float32)


def reference(x: np.ndarray, weight: np.ndarray, group: int, abits: int, wbits: int,
              static: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Q(X)·Q(W) for x (M, K), weight [K, N]: what the lowered graph computes (float64 accumulation)."""
    scale, zero = static if static is not None else activation_params(x, group, abits)
    rows = x.astype(np.float32).reshape(x.shape[0], -1, group)
    codes = np.clip(np.rint(rows / scale) + zero, 0, 2**abits - 1)
    values, weight_scale = group_weight(weight, group, wbits)
    dequantized = ((codes - zero) * scale).astype(np.float64)                     # (M, G, g)
    return np.einsum("mkj,kjn->mn", dequantized, values.astype(np.float64) * weight_scale)


def block_diagonal(values: np.ndarray) -> np.ndarray:
    """(G, g, N) int8 → (G·g, G·N): block k (rows of group k, columns k·N..(k+1)·N) holds values[k]."""
    groups, group, n = values.shape
    out = np.zeros((groups * group, groups * n), np.int8)
    for k in range(groups):
        out[k * group:(k + 1) * group, k * n:(k + 1) * n] = values[k]
    return out


def float_linear(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """(W [K, N] with Gemm's transB and α applied, β·C or None) of a float MatMul/Gemm with a constant weight."""
    unit = match_linear(node)
    weight = weight_array(unit).astype(np.float32)
    weight = weight.T if unit.weight_in_axis == 1 else weight
    bias = None
    if node.op == "Gemm":
        weight = weight * np.float32(node.attrs.get("alpha", 1.0))
        if len(node.inputs) > 2:
            bias = float(node.attrs.get("beta", 1.0)) * constant_value(node.inputs[2]).astype(np.float32)
    return weight, bias


def lower_dynamic_group_plans(ctx: CompileContext, mode: str, target: str) -> str:
    """Lower every plan in ``ctx.dynamic_group_plans`` (``mode``: "integer" or "simulate"); a one-line summary."""
    nodes = {node.name: node for node in ctx.graph.nodes}
    counts: Counter = Counter()
    for plan in ctx.dynamic_group_plans.values():
        node = nodes.get(plan.node)
        if node is None or node.op not in ("MatMul", "Gemm"):
            ctx.fallbacks.append(f"{target}: qdit plan for '{plan.node}' found no float MatMul/Gemm; left float")
            continue
        weight, bias = float_linear(node)
        lower_linear(ctx, node, weight, bias, plan, target, mode)
        lowering = INTEGER if mode == "integer" else SIMULATED
        kind = "static" if plan.static is not None else "dynamic per-token"
        # The integer form writes one int32 sum per output and group: its run time grows with G (report.py warns).
        partial_sums = {"partial_sums_per_output": weight.shape[0] // plan.group} if mode == "integer" else {}
        ctx.records.append(QuantRecord(plan.node, f"{plan.node}/weight", "weight",
                                       f"int{plan.wbits} sym groups(g={plan.group})", lowering, target,
                                       {**plan.details(), **partial_sums}))
        ctx.records.append(QuantRecord(plan.node, plan.tensor, "activation",
                                       f"int{plan.abits} asym {kind} groups(g={plan.group})", lowering, target,
                                       plan.details()))
        counts[lowering] += 1
    ctx.graph.cleanup().toposort()
    return "qdit groups: " + (", ".join(f"{n} × {k}" for k, n in counts.items()) or "nothing lowered")


def lower_linear(ctx: CompileContext, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None,
                 plan: DynamicGroupPlan, target: str, mode: str = "integer") -> gs.Tensor:
    """Replace the GEMM ``node`` (X·W [+ β·C], W [K, N] given with α folded in) by the graph above.

    Its output tensor is now written by the new nodes (so its readers, e.g. a bias Add, are kept).
    """
    x, out = node.inputs[0], node.outputs[0]
    k, n = weight.shape
    group, f32 = plan.group, np.float32
    groups, qmax = k // group, float(2**plan.abits - 1)
    kind = "static" if plan.static is not None else "dynamic per-token"
    form = "one MatMulIntegerToFloat, run-time scales on its sums" if mode == "integer" else "simulated, float MatMul"
    build = Builder(ctx, target, node.name, f"qdit {kind} group-wise (g={group}) int{plan.abits} activations × "
                                            f"int{plan.wbits} group-wise weights: {form}")
    rows = build.op("Reshape", [x, np.array([-1, groups, group], np.int64)], f32)          # (M, G, g)
    scale, zero = _activation_grid(ctx, build, rows, plan, qmax)
    codes = build.op("Clip", [build.op("Add", [build.op("Round", [build.op("Div", [rows, scale], f32)], f32), zero],
                                       f32), np.zeros((), f32), np.array(qmax, f32)], f32)
    values, weight_scale = group_weight(weight, group, plan.wbits)
    if mode == "simulate":
        dequantized = build.op("Mul", [build.op("Sub", [codes, zero], f32), scale], f32)
        flat = build.op("MatMul", [build.op("Reshape", [dequantized, np.array([-1, k], np.int64)], f32),
                                   (values.astype(f32) * weight_scale).reshape(k, n)], f32)
    else:
        flat, bias = _integer_sums(build, codes, scale, zero, values, weight_scale, plan, bias)
    lead = build.op("Slice", [build.op("Shape", [x], np.int64), np.array([0], np.int64), np.array([-1], np.int64)],
                    np.int64)
    shape = build.op("Concat", [lead, np.array([n], np.int64)], np.int64, attrs={"axis": 0})
    if bias is None:
        build.op("Reshape", [flat, shape], f32, outputs=[out])
    else:
        build.op("Add", [build.op("Reshape", [flat, shape], f32), bias.astype(f32)], f32, outputs=[out])
    node.outputs.clear()
    node.inputs.clear()
    return out


def _activation_grid(ctx, build: Builder, rows, plan: DynamicGroupPlan, qmax: float):
    """(s, z): run-time (M, G, 1) tensors, or the plan's constants (1, G, 1)."""
    f32 = np.float32
    if plan.static is not None:
        return build.const("scale", plan.static[0].astype(f32)), build.const("zero_point", plan.static[1].astype(f32))
    axes = _axes(ctx, [-1], since=18)
    low = build.op("Min", [build.op("ReduceMin", [rows, *axes[0]], f32, attrs={"keepdims": 1, **axes[1]}),
                           np.zeros((), f32)], f32)
    high = build.op("Max", [build.op("ReduceMax", [rows, *axes[0]], f32, attrs={"keepdims": 1, **axes[1]}),
                            np.zeros((), f32)], f32)
    scale = build.op("Max", [build.op("Div", [build.op("Sub", [high, low], f32), np.array(qmax, f32)], f32),
                             np.array(MIN_SCALE, f32)], f32)
    zero = build.op("Clip", [build.op("Round", [build.op("Div", [build.op("Neg", [low], f32), scale], f32)], f32),
                             np.zeros((), f32), np.array(qmax, f32)], f32)
    return scale, zero


def _integer_sums(build: Builder, codes, scale, zero, values, weight_scale, plan, bias):
    """(Y without bias (M, N), the bias to add): one MatMulInteger, then the scales (module docstring)."""
    f32 = np.float32
    groups, group, n = values.shape
    k = groups * group
    codes = build.op("Cast", [codes], np.uint8, attrs={"to": onnx.TensorProto.UINT8})
    codes = build.op("Reshape", [codes, np.array([-1, k], np.int64)], np.uint8)               # (M, K)
    # s_w·I in one kernel: ORT's MatMulIntegerToFloat, exact int32 sums times a per-column scale.
    column_scale = weight_scale[:, 0, :]                                                      # (G, N)
    if plan.static is not None:  # constant s: into the column scales
        column_scale = column_scale * plan.static[0].reshape(groups, 1)
    sums = build.op("MatMulIntegerToFloat", [codes, block_diagonal(values), np.array(1.0, f32),
                                             column_scale.reshape(-1).astype(f32)], f32, domain="com.microsoft")
    sums = build.op("Reshape", [sums, np.array([-1, groups, n], np.int64)], f32)             # (M, G, N)
    correction = weight_scale[:, 0, :] * values.astype(np.int64).sum(axis=1).astype(f32)     # D (G, N)
    if plan.static is not None:  # constant z: the zero-point term into the bias
        s, z = plan.static[0].reshape(groups, 1), plan.static[1].reshape(groups, 1)
        axes = _axes(build.ctx, [1], since=13)
        flat = build.op("ReduceSum", [sums, *axes[0]], f32, attrs={"keepdims": 0, **axes[1]})
        shift = -(s * z * correction).sum(axis=0).astype(f32)
        return flat, shift if bias is None else (bias + shift).astype(f32)
    weighted = sums
    row_scale = build.op("Reshape", [scale, np.array([-1, 1, groups], np.int64)], f32)        # (M, 1, G)
    main = build.op("Reshape", [build.op("MatMul", [row_scale, weighted], f32), np.array([-1, n], np.int64)], f32)
    shifted = build.op("Reshape", [build.op("Mul", [scale, zero], f32), np.array([-1, groups], np.int64)], f32)
    flat = build.op("Sub", [main, build.op("MatMul", [shifted, correction.astype(f32)], f32)], f32)
    return flat, bias


def _axes(ctx: CompileContext, axes: list[int], since: int) -> tuple[list, dict]:
    """Reduce* axes: an input from opset ``since`` (ReduceSum 13, ReduceMin/Max 18), an attribute before."""
    return ([np.array(axes, np.int64)], {}) if int(ctx.graph.opset) >= since else ([], {"axes": axes})
