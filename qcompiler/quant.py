"""Quantization specs and the numpy reference of quantize/dequantize that tests and passes share.

Uniform affine (docs/algorithms.md §3):
    q = clamp(round(x / s) + z, qmin, qmax)        x_hat = s * (q - z)
    asymmetric: s = (max - min) / (2^b - 1),  z = round(-min / s)    (range widened to include 0)
    symmetric:  s = max|x| / (2^(b-1) - 1),   z = 0                  (q in [-(2^(b-1)-1), 2^(b-1)-1])
``round`` is round-half-to-even, as ONNX QuantizeLinear specifies, so this reference and ORT
agree bit for bit. Values below 8 bits live in 8-bit containers with a narrowed [qmin, qmax].
Granularity: one scale per tensor, per index of an ``axis``, per ``block_size`` elements along
an axis, or per group given by ``group_labels`` along an axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Granularity = Literal["tensor", "axis", "block", "groups"]
#: Smallest scale allowed: a constant tensor would otherwise give s = 0 and a division by zero.
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. ``axis`` is the axis that carries per-index scales."""

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "tensor"
    axis: int | None = None
    block_size: int | None = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.granularity in ("axis", "block", "groups") and self.axis is None:
            raise ValueError(f"granularity '{self.granularity}' needs an axis")
        if self.granularity == "block" and not self.block_size:
            raise ValueError("granularity 'block' needs a block_size")

    @property
    def signed(self) -> bool:
        """Symmetric specs use a signed container (zero point 0); asymmetric ones unsigned."""
        return self.symmetric

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def container(self) -> np.dtype:
        return np.dtype(np.int8) if self.signed else np.dtype(np.uint8)

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        detail = {"tensor": "per-tensor", "axis": f"per-axis({self.axis})",
                  "block": f"block({self.block_size}, axis {self.axis})",
                  "groups": f"groups(axis {self.axis})"}[self.granularity]
        return f"int{self.bits} {kind} {detail}"


def scale_zero_point(min_value, max_value, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point from ranges (scalars or arrays) by the formulas in the module doc."""
    min_value = np.minimum(np.asarray(min_value, dtype=np.float64), 0.0)
    max_value = np.maximum(np.asarray(max_value, dtype=np.float64), 0.0)
    if spec.symmetric:
        absmax = np.maximum(np.abs(min_value), np.abs(max_value))
        scale = np.maximum(absmax / spec.qmax, MIN_SCALE)
        zero_point = np.zeros_like(scale)
    else:
        scale = np.maximum((max_value - min_value) / (spec.qmax - spec.qmin), MIN_SCALE)
        zero_point = np.clip(np.rint(spec.qmin - min_value / scale), spec.qmin, spec.qmax)
    return scale.astype(np.float32), zero_point.astype(spec.container)


def group_ranges(index_min: np.ndarray, index_max: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group's range: [min of its members' a^min, max of their a^max]."""
    groups = int(labels.max()) + 1
    low = np.array([index_min[labels == g].min() for g in range(groups)])
    high = np.array([index_max[labels == g].max() for g in range(groups)])
    return low, high


def shared_zero_point(group_min, group_max, spec: QuantSpec, own_scales=None) -> tuple[np.ndarray, int]:
    """(σ_g, z): one zero point for every group and the smallest scale per group that holds its range.

    For a candidate z, σ_g(z) = max(−min_g/(z − qmin), max_g/(qmax − z)) (ranges widened to include
    0); z minimises max_g σ_g(z)/s_g, the worst loss of resolution against each group's own scale
    s_g (``own_scales``; by default those of ``scale_zero_point``). With one zero point the value 0
    has the same code z in every group, so a per-channel rescale of x keeps zero-padding exact."""
    low = np.minimum(np.asarray(group_min, np.float64), 0.0)
    high = np.maximum(np.asarray(group_max, np.float64), 0.0)
    if own_scales is None:
        own_scales = scale_zero_point(low, high, spec)[0]
    z = np.arange(spec.qmin, spec.qmax + 1, dtype=np.float64)[:, None]
    below = np.where(low < 0, -low / np.maximum(z - spec.qmin, 1e-30), 0.0)
    above = np.where(high > 0, high / np.maximum(spec.qmax - z, 1e-30), 0.0)
    sigma = np.maximum(np.maximum(below, above), MIN_SCALE)
    best = int(np.argmin(np.max(sigma / np.asarray(own_scales, np.float64), axis=1)))
    return sigma[best].astype(np.float32), int(z[best, 0])


def _broadcast(param: np.ndarray, x_ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * x_ndim
    shape[axis % x_ndim] = param.shape[0]
    return param.reshape(shape)


def quantize(x: np.ndarray, scale, zero_point, spec: QuantSpec, axis: int | None = None) -> np.ndarray:
    """q = clamp(round(x / s) + z, qmin, qmax) with per-index parameters broadcast along ``axis``."""
    scale = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zero_point = _broadcast(np.asarray(zero_point).astype(np.int32), x.ndim, axis)
    # Divide in float32 like ORT's QuantizeLinear so rounding ties land identically.
    return _round_clamp(x.astype(np.float32) / scale, zero_point, spec)


def _round_clamp(scaled: np.ndarray, zero_point, spec: QuantSpec) -> np.ndarray:
    """clamp(round(scaled) + z, qmin, qmax) in the container type, computed in place in float32
    (``scaled``: a float32 array the caller owns). Exact: below 2^24 a rounded value plus an integer
    z is exact in float32, and anything larger clamps to the same code; a float64 sum (float32 plus
    int32 arrays) would only double the memory traffic of weight-sized arrays."""
    q = np.rint(scaled, out=scaled)
    zero_point = np.asarray(zero_point)
    if np.any(zero_point):
        q += zero_point.astype(np.float32)
    np.clip(q, spec.qmin, spec.qmax, out=q)
    return q.astype(spec.container)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """x_hat = s * (q - z)."""
    scale = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zero_point = _broadcast(np.asarray(zero_point).astype(np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - zero_point).astype(np.float32) * scale).astype(np.float32)


def expand_blocks(param: np.ndarray, length: int, block_size: int) -> np.ndarray:
    """Repeat per-block parameters (..., n_blocks) to per-element (..., length) along the last axis."""
    return np.repeat(param, block_size, axis=-1)[..., :length]


def block_ranges(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max of ``w`` along ``axis`` (zero-padded to whole blocks), block axis last."""
    moved = np.moveaxis(w, axis, -1)
    length = moved.shape[-1]
    pad = (-length) % block_size
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    blocks = padded.reshape(*padded.shape[:-1], -1, block_size)
    return blocks.min(axis=-1), blocks.max(axis=-1)


def element_params(x: np.ndarray, spec: QuantSpec, scale: np.ndarray, zero_point: np.ndarray,
                   group_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expand tensor/axis/block/group parameters to arrays broadcastable against ``x``."""
    if spec.granularity == "tensor":
        return np.asarray(scale), np.asarray(zero_point)
    axis = spec.axis % x.ndim
    if spec.granularity == "axis":
        return _broadcast(scale, x.ndim, axis), _broadcast(zero_point, x.ndim, axis)
    if spec.granularity == "groups":
        if group_labels is None:
            raise ValueError("granularity 'groups' needs group_labels")
        return (_broadcast(np.asarray(scale)[group_labels], x.ndim, axis),
                _broadcast(np.asarray(zero_point)[group_labels], x.ndim, axis))
    # block: parameters have the block axis last; move it back to `axis`.
    length = x.shape[axis]
    s = np.moveaxis(expand_blocks(np.asarray(scale), length, spec.block_size), -1, axis)
    z = np.moveaxis(expand_blocks(np.asarray(zero_point), length, spec.block_size), -1, axis)
    return s, z


def params_from_tensor(x: np.ndarray, spec: QuantSpec, group_labels: np.ndarray | None = None):
    """Min/max ranges of ``x`` reduced at the spec's granularity, turned into (scale, zero_point)."""
    if spec.granularity == "tensor":
        return scale_zero_point(x.min(), x.max(), spec)
    axis = spec.axis % x.ndim
    if spec.granularity == "block":
        low, high = block_ranges(x, axis, spec.block_size)
        return scale_zero_point(low, high, spec)
    other = tuple(i for i in range(x.ndim) if i != axis)
    low, high = x.min(axis=other), x.max(axis=other)
    if spec.granularity == "groups":
        groups = int(group_labels.max()) + 1
        low = np.array([low[group_labels == g].min() for g in range(groups)])
        high = np.array([high[group_labels == g].max() for g in range(groups)])
    return scale_zero_point(low, high, spec)


def fake_quantize(x: np.ndarray, spec: QuantSpec, scale=None, zero_point=None,
                  group_labels: np.ndarray | None = None) -> np.ndarray:
    """dequantize(quantize(x)): the simulated value every lowering must reproduce.

    With ``scale``/``zero_point`` omitted they come from ``x``'s own min/max (weights).
    Error bound inside the clipping range: |x - x_hat| <= s/2 element-wise.
    """
    if scale is None:
        scale, zero_point = params_from_tensor(x, spec, group_labels)
    s, z = element_params(x, spec, np.asarray(scale), np.asarray(zero_point), group_labels)
    s, z = s.astype(np.float32, copy=False), z.astype(np.float32, copy=False)
    # All in float32, in place: q and z are integers well inside float32's exact range, and the
    # float32 product (q − z)·s is the correctly rounded one, so this equals the float64 route
    # bit for bit at half the memory traffic (the OS+/SmoothQuant searches call this per candidate).
    q = np.rint(np.asarray(x, np.float32) / s)
    q += z
    np.clip(q, spec.qmin, spec.qmax, out=q)
    q -= z
    q *= s
    return q


def quantize_weight(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer weight and its (scale, zero_point) at the spec's granularity (min/max ranges)."""
    scale, zero_point = params_from_tensor(w, spec)
    s, z = element_params(w, spec, scale, zero_point)
    return _round_clamp(w.astype(np.float32) / s.astype(np.float32), z, spec), scale, zero_point


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10·log10(Σx² / Σ(x − x̂)²) in dB (inf when exact)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(approximation, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
