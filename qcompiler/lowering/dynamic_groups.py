"""Q-DiT's group-wise GEMM: activations quantized per token and input-channel group at run time, one batched
integer GEMM, per-(token, group) and per-(group, column) scales applied to its int32 partial sums.

For a Linear Y = X·W (+ b), X of shape (..., K), groups of g input channels (G = K/g):
    activations, per row m and group k (dynamic, asymmetric, ``abits``):
        lo = min(0, min X[m, k·g:(k+1)·g]),  hi = max(0, max …),  s = max((hi − lo)/q_max, ε),
        z = clamp(round(−lo/s), 0, q_max),  q = clamp(round(X/s) + z, 0, q_max)          (uint8)
    weights, per group k and column n (symmetric, ``wbits``): s_w = max|W[k·g:(k+1)·g, n]|/q_w,
        W_q = clamp(round(W/s_w), −q_w, q_w)                                             (int8)
    Y[m, n] = Σ_k s[m, k]·s_w[k, n]·( Σ_j q[m, k, j]·W_q[k, j, n] − z[m, k]·Σ_j W_q[k, j, n] )
The inner sums are one MatMulInteger over the G groups as a batch (uint8 × int8 → int32, exact);
the rest is float elementwise work and a ReduceSum over k. ``static`` ranges replace lo/hi by
constants from calibration (one per group), as the ablation of Q-DiT's dynamic quantization.
Equal, to float32 rounding, to ``reference`` below (the numpy simulation the passes and tests use).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.lowering.channel_groups import Builder
from qcompiler.quant import MIN_SCALE


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


def lower_linear(ctx: CompileContext, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None, group: int,
                 abits: int, wbits: int, pass_name: str,
                 static: tuple[np.ndarray, np.ndarray] | None = None) -> gs.Tensor:
    """Replace the GEMM ``node`` (X·W [+ β·C], W [K, N] given with α folded in) by the graph above.

    Its output tensor is now written by the new nodes (so its readers, e.g. a bias Add, are kept).
    ``static``: constant (s, z) of shape (1, G, 1) instead of the run-time ranges.
    """
    x, out = node.inputs[0], node.outputs[0]
    k, n = weight.shape
    groups, qmax = k // group, float(2**abits - 1)
    kind = "static" if static is not None else "dynamic per-token"
    build = Builder(ctx, pass_name, node.name, f"{kind} group-wise (g={group}) int{abits} activations × int{wbits} "
                                               "group-wise weights: one batched MatMulInteger, scales on its int32 sums")
    f32 = np.float32
    rows = build.op("Reshape", [x, np.array([-1, groups, group], np.int64)], f32)          # (M, G, g)
    if static is None:
        axes = _axes(ctx, [-1], since=18)
        low = build.op("Min", [build.op("ReduceMin", [rows, *axes[0]], f32, attrs={"keepdims": 1, **axes[1]}),
                               np.zeros((), f32)], f32)
        high = build.op("Max", [build.op("ReduceMax", [rows, *axes[0]], f32, attrs={"keepdims": 1, **axes[1]}),
                                np.zeros((), f32)], f32)
        scale = build.op("Max", [build.op("Div", [build.op("Sub", [high, low], f32), np.array(qmax, f32)], f32),
                                 np.array(MIN_SCALE, f32)], f32)
        zero = build.op("Clip", [build.op("Round", [build.op("Div", [build.op("Neg", [low], f32), scale], f32)], f32),
                                 np.zeros((), f32), np.array(qmax, f32)], f32)
    else:
        scale, zero = build.const("scale", static[0].astype(f32)), build.const("zero_point", static[1].astype(f32))
    codes = build.op("Clip", [build.op("Add", [build.op("Round", [build.op("Div", [rows, scale], f32)], f32), zero],
                                       f32), np.zeros((), f32), np.array(qmax, f32)], f32)
    codes = build.op("Cast", [codes], np.uint8, attrs={"to": onnx.TensorProto.UINT8})
    values, weight_scale = group_weight(weight, group, wbits)
    batched = build.op("Transpose", [codes], np.uint8, attrs={"perm": [1, 0, 2]})             # (G, M, g)
    sums = build.cast_float(build.op("MatMulInteger", [batched, values], np.int32))            # (G, M, N)
    column_sums = values.astype(np.int64).sum(axis=1, keepdims=True).astype(f32)              # (G, 1, N)
    if static is None:  # (M, G, 1) → (G, M, 1), beside the (G, M, N) sums
        per_row = build.op("Transpose", [zero], f32, attrs={"perm": [1, 0, 2]})
        row_scale = build.op("Transpose", [scale], f32, attrs={"perm": [1, 0, 2]})
    else:  # constants (1, G, 1) → (G, 1, 1)
        per_row = build.const("zero_point_t", np.transpose(static[1], (1, 0, 2)).astype(f32))
        row_scale = build.const("scale_t", np.transpose(static[0], (1, 0, 2)).astype(f32))
    centred = build.op("Sub", [sums, build.op("Mul", [per_row, column_sums], f32)], f32)
    scaled = build.op("Mul", [build.op("Mul", [centred, row_scale], f32), weight_scale], f32)
    axes = _axes(ctx, [0], since=13)
    flat = build.op("ReduceSum", [scaled, *axes[0]], f32, attrs={"keepdims": 0, **axes[1]})   # (M, N)
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


def _axes(ctx: CompileContext, axes: list[int], since: int) -> tuple[list, dict]:
    """Reduce* axes: an input from opset ``since`` (ReduceSum 13, ReduceMin/Max 18), an attribute before."""
    return ([np.array(axes, np.int64)], {}) if int(ctx.graph.opset) >= since else ([], {"axes": axes})
