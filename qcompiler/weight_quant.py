"""Weight grids: min/max or MSE clip-searched symmetric scales, shared by passes and lowerings.

MSE clip search (docs/algorithms.md §3): per output channel (or block) s_w = r*·max|W|/q_max with
r* = argmin_{r ∈ clip_ratios} ‖W − Ŵ_r‖² (r = 1 is min/max; values beyond r·max|W| clip to ±q_max).
``quantize_by_rule`` re-derives a weight grid with the rule ``quantize_weights`` recorded
(``grids.WeightRule``), for lowerings that rescale weight rows (DGQ's channel affine).
"""

from __future__ import annotations

import numpy as np

from qcompiler.grids import WeightRule
from qcompiler.quant import MIN_SCALE, QuantSpec, element_params, params_from_tensor, quantize_weight

#: Clip ratios tried by ``clip_search``: 1.0, 0.95, ..., 0.5.
DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))



def reduce_to_params(error: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Sum a per-element error to the shape of the spec's parameters (block axis last for blocks)."""
    if spec.granularity == "tensor":
        return np.asarray(error.sum())
    axis = spec.axis % error.ndim
    if spec.granularity == "axis":
        return error.sum(axis=tuple(i for i in range(error.ndim) if i != axis))
    moved = np.moveaxis(error, axis, -1)
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, (-moved.shape[-1]) % spec.block_size)])
    return padded.reshape(*padded.shape[:-1], -1, spec.block_size).sum(axis=-1)


def quantize_weight_clipped(w: np.ndarray, spec: QuantSpec, ratios=DEFAULT_CLIP_RATIOS):
    """Like ``quant.quantize_weight`` (symmetric specs) with each scale from an MSE clip search.

    s = r*·s_minmax per channel/block, r* = argmin_r Σ (W − s_r·clamp(round(W/s_r)))² over ``ratios``.
    """
    if not spec.symmetric:
        raise ValueError("quantize_weight_clipped: symmetric weight specs only")
    base, zero_point = params_from_tensor(w, spec)
    best_scale, best_error = base.copy(), None
    w32 = w.astype(np.float32)
    for ratio in ratios:
        scale = np.maximum(base * np.float32(ratio), MIN_SCALE).astype(np.float32)
        s, _ = element_params(w32, spec, scale, zero_point)
        q = np.clip(np.rint(w32 / s), spec.qmin, spec.qmax)
        error = reduce_to_params(np.square(w32 - q * s, dtype=np.float64), spec)
        better = error < best_error if best_error is not None else np.ones_like(error, bool)
        best_scale = np.where(better, scale, best_scale).astype(np.float32)
        best_error = np.where(better, error, best_error) if best_error is not None else error
    s, _ = element_params(w32, spec, best_scale, zero_point)
    q = np.clip(np.rint(w32 / s), spec.qmin, spec.qmax).astype(spec.container)
    return q, best_scale, zero_point



def quantize_by_rule(w: np.ndarray, spec: QuantSpec, rule: WeightRule):
    """``quantize_weight`` or, when ``rule`` has clip ratios, ``quantize_weight_clipped`` over them."""
    if rule.clip_ratios:
        return quantize_weight_clipped(w, spec, rule.clip_ratios)
    return quantize_weight(w, spec)
