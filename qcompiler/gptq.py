"""GPTQ weight quantization (Frantar et al., 2023): round one input column at a time, feed the error forward.

For a GEMM Y = X·Wᵀ with W [N, K] (rows: output channels) and calibration inputs X [M, K]:

    H = XᵀX + λ·I,   λ = damp · mean(diag(XᵀX))          (the layer-output error's Hessian, up to 2)
    U = chol(H⁻¹)ᵀ   (upper)                              (Algorithm 1 of the paper)
    for each column k (in blocks of ``block`` columns, the paper's lazy batch updates):
        q_k = clamp(round(w_k / s), ±q_max) · s
        e_k = (w_k − q_k) / U[k, k]
        w_j ← w_j − e_k · U[k, j]   for j > k              (the rest of the block now; later blocks once)

Scales: symmetric, per output channel (``group = None``: from W before any update), or per
(output channel, group of ``group`` input columns) computed when the group's first column is
reached, from the columns as updated so far (the paper's grouping); each scale is min/max or, with
``clip_ratios``, the ratio r·max|w| minimizing the group's squared rounding error. Columns no
calibration input touches (diag(H) = 0) are zeroed. The result minimizes ‖X·Wᵀ − X·Ŵᵀ‖² greedily,
not ‖W − Ŵ‖²: the weight error rises, the layer-output error falls (tests/core/test_gptq.py).
"""

from __future__ import annotations

import numpy as np


def _scales(w: np.ndarray, qmax: int, ratios: tuple[float, ...]) -> np.ndarray:
    """Per row of ``w`` [N, g]: s = r*·max|w|/q_max, r* minimizing Σ (w − s·clamp(round(w/s)))² over ``ratios``."""
    base = np.maximum(np.abs(w).max(axis=1), 1e-12) / qmax
    best, best_error = base, None
    for ratio in ratios or (1.0,):
        s = base * ratio
        error = np.square(w - np.clip(np.rint(w / s[:, None]), -qmax, qmax) * s[:, None]).sum(axis=1)
        better = error < best_error if best_error is not None else np.ones_like(error, bool)
        best = np.where(better, s, best)
        best_error = error if best_error is None else np.minimum(error, best_error)
    return best


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, group: int | None = None, block: int = 128,
                  damp: float = 0.01, clip_ratios: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes [N, K] (int8 container) and scales ([N] or [N, ceil(K/group)]) of ``w`` [N, K]."""
    n, k = w.shape
    if group is not None and block % group:
        raise ValueError(f"gptq: block ({block}) must be a multiple of group ({group})")
    qmax = 2 ** (bits - 1) - 1
    W = w.astype(np.float64).copy()
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = UᵀU
    codes = np.zeros((n, k), np.int8)
    scales = np.zeros((n, -(-k // group)) if group else n)
    if group is None:
        scales[:] = _scales(W, qmax, clip_ratios)
    for start in range(0, k, block):
        end = min(start + block, k)
        W1, U1 = W[:, start:end].copy(), U[start:end, start:end]
        errors = np.zeros((n, end - start))
        for i in range(end - start):
            column = start + i
            if group is not None and column % group == 0:
                scales[:, column // group] = _scales(W1[:, i:i + group], qmax, clip_ratios)
            s = scales[:, column // group] if group else scales
            q = np.clip(np.rint(W1[:, i] / s), -qmax, qmax)
            codes[:, column] = q
            errors[:, i] = (W1[:, i] - q * s) / U1[i, i]
            W1[:, i + 1:] -= np.outer(errors[:, i], U1[i, i + 1:])
        W[:, end:] -= errors @ U[start:end, end:]
    return codes, scales.astype(np.float32)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, group: int | None = None) -> np.ndarray:
    """Ŵ [N, K] from ``gptq_quantize``'s codes and scales."""
    if group is None:
        return (codes * scales[:, None]).astype(np.float32)
    return (codes * np.repeat(scales, group, axis=1)[:, :codes.shape[1]]).astype(np.float32)


def conv_patches(x: np.ndarray, attrs: dict, kernel: tuple[int, int], rows: int, rng) -> np.ndarray | None:
    """Up to ``rows`` im2col rows [M, C·kh·kw] of a 2-D Conv's input (groups = 1), at random output positions.

    None when the Conv is not one this reads (auto_pad, groups, not 2-D)."""
    if x.ndim != 4 or attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    kh, kw = kernel
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    out_h = (padded.shape[2] - span_h) // sh + 1
    out_w = (padded.shape[3] - span_w) // sw + 1
    positions = x.shape[0] * out_h * out_w
    index = np.sort(rng.choice(positions, size=min(rows, positions), replace=False))
    b, rest = np.divmod(index, out_h * out_w)
    oh, ow = np.divmod(rest, out_w)
    ii = oh[:, None, None] * sh + np.arange(kh)[None, :, None] * dh      # [M, kh, 1]
    jj = ow[:, None, None] * sw + np.arange(kw)[None, None, :] * dw      # [M, 1, kw]
    patches = padded[b[:, None, None], :, ii, jj]                          # [M, kh, kw, C]
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2).reshape(len(index), -1))


def layer_rows(unit, x: np.ndarray, rows: int, rng) -> np.ndarray | None:
    """Up to ``rows`` input rows [M, K] of a Linear (its input's last axis) or a Conv (im2col); None if unread."""
    if unit.node.op == "Conv":
        kernel = tuple(np.shape(unit.weight.values)[2:])
        return conv_patches(x, unit.node.attrs, kernel, rows, rng) if len(kernel) == 2 else None
    flat = x.reshape(-1, x.shape[-1])
    if len(flat) > rows:
        flat = flat[np.sort(rng.choice(len(flat), size=rows, replace=False))]
    return flat


def collect_hessians(ctx, units, batches, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """H = Σ XᵀX (float64) per unit's node name, on up to ``rows`` seeded rows of each batch's input."""
    from qcompiler.calibration.capture import stream_tensors
    from qcompiler.calibration.statistics import StatsConfig

    readers: dict[str, list] = {}
    for unit in units:
        readers.setdefault(unit.node.inputs[0].name, []).append(unit)
    hessians: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    config = StatsConfig(progress=True, threads=ctx.threads)
    for _, outputs in stream_tensors(ctx.skeleton(), batches, sorted(readers), config, desc="GPTQ Hessians"):
        for name in sorted(outputs):
            for unit in readers[name]:
                x = layer_rows(unit, np.asarray(outputs[name], np.float32), rows, rng)
                if x is None:
                    continue
                x = x.astype(np.float64)
                hessians[unit.node.name] = hessians.get(unit.node.name, 0.0) + x.T @ x
    ctx.release_weight_pages()
    return hessians
