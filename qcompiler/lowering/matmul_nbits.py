"""Packing of block-wise int4 weights into ONNX Runtime's MatMulNBits (com.microsoft) layout.

MatMulNBits computes Y = A · dequant(B) with B stored per output column n as
``n_blocks = ceil(K / block_size)`` blocks of uint4 (two per byte, low nibble first) and one
float scale per (n, block); with no zero_points input the zero point is 8, so a symmetric
int4 value q ∈ [-7, 7] is stored as q + 8. ``accuracy_level=4`` makes the CPU kernel quantize
A to int8 per block at run time and run an int8 GEMM.
"""

from __future__ import annotations

import numpy as np

from qcompiler.quant import QuantSpec, quantize_weight

MATMUL_NBITS_ZERO_POINT = 8


def quantize_int4_blocks(weight_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per (column, block): returns q [N, K] in [-7, 7] and scales [N, n_blocks]."""
    spec = QuantSpec(bits=4, symmetric=True, granularity="block", axis=1, block_size=block_size)
    q, scale, _ = quantize_weight(np.ascontiguousarray(weight_kn.T), spec)
    return q, scale


def pack_matmul_nbits(q_nk: np.ndarray, block_size: int) -> np.ndarray:
    """Pack int4 values [N, K] into uint8 [N, n_blocks, block_size/2] (zero-padded last block)."""
    n, k = q_nk.shape
    pad = (-k) % block_size
    unsigned = np.pad(q_nk.astype(np.int16) + MATMUL_NBITS_ZERO_POINT, ((0, 0), (0, pad)),
                      constant_values=MATMUL_NBITS_ZERO_POINT).astype(np.uint8)
    pairs = unsigned.reshape(n, -1, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def dequantize_matmul_nbits(q_nk: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """The float weight [K, N] MatMulNBits computes with (numpy reference for tests)."""
    n, k = q_nk.shape
    per_element = np.repeat(scales, block_size, axis=1)[:, :k]
    return (q_nk.astype(np.float32) * per_element).T.astype(np.float32)


def unpack_matmul_nbits(packed: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``pack_matmul_nbits``: int4 values [N, K] from uint8 [N, n_blocks, block_size/2]."""
    n = packed.shape[0]
    low, high = packed & 0x0F, packed >> 4
    unsigned = np.stack([low, high], axis=-1).reshape(n, -1)[:, :k]
    return (unsigned.astype(np.int16) - MATMUL_NBITS_ZERO_POINT).astype(np.int8)
