"""Pass ``log2_attention`` (DGQ): quantize every Softmax output with a dynamic log2 quantizer.

Rewrite, for each attention probability tensor A (the Softmax output, keys on the last axis):
    s = max(A[..., 1:])  per sample, at run time      (cross-attention: the start token is exempt)
    s = max(A)           per sample                   (no exempt column: self-attention by default)
    q = clamp(round(−log2(A/s)), 0, 2^b − 1),   Â = s·2^(−q)
as Slice → ReduceMax → Div → Log → Mul(−1/ln 2) → Round → Clip → Cast → Gather(levels) → Mul, where
levels[q] = 2^−q is a table of the 2^b exact powers of two (a Gather is exact and ~6× faster than
Pow(2, −q) in ORT on CPU; Exp(−q·ln 2) is faster still but not exact). In
cross-attention Concat(A[..., :1], Â[..., 1:]) keeps the first key column (the start token,
which the DGQ paper finds draws most of the cross-attention) exact. ``keep_start_token`` lists the attention kinds
("cross", "self") whose first column is exempt. b = ``bits`` or the recipe's activation bits.
The max is taken over the quantized columns only, so they never clip: A/s ≤ 1 and q ≥ 0.

A = 0 (and anything below s·2^−(2^b−1)): Log gives −inf, so q clamps to 2^b − 1 and
Â = s·2^−(2^b−1), the quantizer's smallest level (in float32 that is 0 for b = 8, since 2^−255
underflows; 2^−63·s for b = 6). s itself is floored at 1e-30 so an all-zero row gives 0, not NaN.
Error bound: for s·2^−(2^b−1) ≤ A ≤ s, Â/A ∈ [2^−½, 2^½] (a relative error of at most 41%,
small in absolute terms exactly where A is small); below that |A − Â| ≤ s·2^−(2^b−1).
Simulated in plain ONNX ops: neither ORT nor TensorRT has a log-domain kernel.

``quantizer="linear"`` is the ablation baseline (DGQ's "linear vs log2" table): the same dynamic s
and start-token exemption, a uniform grid instead of powers of two:
    q = clamp(round(A/s·(2^b − 1)), 0, 2^b − 1),   Â = s·q/(2^b − 1),   |A − Â| ≤ s/(2(2^b − 1)).
Run it before ``quantize_weights``: ``find_attention`` tells self from cross attention by tracing
Q and K back to a constant-weight projection, and a DequantizeLinear weight is not constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qcompiler.lowering.channel_groups import Builder

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.patterns import Attention, find_attention

LOWERING = "simulated (no log-domain kernel in ORT/TensorRT)"
#: Floor of s: keeps A/s finite when every quantized probability of a sample is 0.
MIN_MAX = 1e-30


@dataclass(frozen=True)
class Log2AttentionConfig:
    bits: int | None = None  # None: the recipe's abits
    keep_start_token: tuple[str, ...] = ("cross",)
    quantizer: str = "log2"  # "log2" | "linear" (the uniform-grid ablation)

    def __post_init__(self):
        if self.quantizer not in ("log2", "linear"):
            raise ValueError(f"Log2AttentionConfig: quantizer must be 'log2' or 'linear', got {self.quantizer!r}")
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"Log2AttentionConfig: bits must be in [2, 8], got {self.bits}")
        unknown = set(self.keep_start_token) - {"self", "cross"}
        if unknown:
            raise ValueError(f"Log2AttentionConfig: keep_start_token takes 'self'/'cross', got {sorted(unknown)}")


def power_levels(bits: int) -> np.ndarray:
    """2^−q for q = 0 … 2^b − 1 in float32 (those below 2^−149 underflow to 0, as in the reference)."""
    return np.power(np.float32(2.0), -np.arange(2**bits, dtype=np.float32)).astype(np.float32)


def log2_quantize(a: np.ndarray, bits: int, keep_start_token: bool) -> np.ndarray:
    """The numpy reference of the rewrite (float32, the ops in the order the graph runs them)."""
    a = np.asarray(a, dtype=np.float32)
    rest = a[..., 1:] if keep_start_token else a
    axes = tuple(range(1, a.ndim))
    s = np.maximum(rest.max(axis=axes, keepdims=True), np.float32(MIN_MAX))
    with np.errstate(divide="ignore"):
        exponent = np.log(rest / s) * np.float32(-1.0 / math.log(2.0))
    q = np.clip(np.rint(exponent), 0, 2**bits - 1).astype(np.float32)
    quantized = (s * np.power(np.float32(2.0), -q)).astype(np.float32)
    return np.concatenate([a[..., :1], quantized], axis=-1) if keep_start_token else quantized


def linear_quantize(a: np.ndarray, bits: int, keep_start_token: bool) -> np.ndarray:
    """The numpy reference of ``quantizer="linear"``: Â = s·clamp(round(A/s·(2^b−1)), 0, 2^b−1)/(2^b−1)."""
    a = np.asarray(a, dtype=np.float32)
    rest = a[..., 1:] if keep_start_token else a
    s = np.maximum(rest.max(axis=tuple(range(1, a.ndim)), keepdims=True), np.float32(MIN_MAX))
    top = np.float32(2**bits - 1)
    q = np.clip(np.rint((rest / s) * top), 0, top).astype(np.float32)
    quantized = (q * (s / top)).astype(np.float32)
    return np.concatenate([a[..., :1], quantized], axis=-1) if keep_start_token else quantized


class Log2Attention(Pass):
    """Â = s·2^−clamp(round(−log2(A/s)), 0, 2^b−1) on every Softmax output; see the module docstring."""

    name = "log2_attention"
    Config = Log2AttentionConfig

    def call(self, ctx: CompileContext) -> PassResult:
        bits = self.config.bits or ctx.settings.abits
        changed, skipped = 0, []
        for attention in find_attention(ctx.graph):
            probabilities = attention.probabilities
            rank = len(probabilities.shape) if probabilities.shape else 0
            if rank < 2:
                skipped.append(f"'{attention.softmax.name}': rank of its output unknown")
                continue
            keep = attention.kind in self.config.keep_start_token
            self._rewrite(ctx, attention, rank, bits, keep)
            spec = f"{self.config.quantizer} uint{bits} dynamic (s = max A{'[..., 1:]' if keep else ''} per sample)"
            ctx.records.append(QuantRecord(attention.softmax.name, probabilities.name, "activation", spec, LOWERING,
                                           self.name, {"attention": attention.kind, "start_token_exact": keep}))
            changed += 1
        if not changed:
            return PassResult(False, ("no attention Softmax found",) + tuple(skipped))
        ctx.graph.cleanup().toposort()
        return PassResult(True, (f"{changed} attention probabilities {self.config.quantizer}-quantized ({bits} bits)",)
                          + tuple(skipped))

    def _rewrite(self, ctx: CompileContext, attention: Attention, rank: int, bits: int, keep: bool) -> None:
        a = attention.probabilities
        consumers = list(a.outputs)
        b = Builder(ctx, self.name, a.name, f"{self.config.quantizer} quantizer ({bits} bits) of {attention.kind}-attention "
                                             f"probabilities{', start token kept exact' if keep else ''}")
        rest = self._columns(b, a, 1, np.iinfo(np.int64).max) if keep else a
        axes = list(range(1, rank))
        if ctx.graph.opset >= 18:
            peak = b.op("ReduceMax", [rest, np.array(axes, np.int64)], np.float32, attrs={"keepdims": 1})
        else:
            peak = b.op("ReduceMax", [rest], np.float32, attrs={"axes": axes, "keepdims": 1})
        peak = b.op("Max", [peak, np.array(MIN_MAX, np.float32)], np.float32)
        ratio = b.op("Div", [rest, peak], np.float32)
        if self.config.quantizer == "linear":
            quantized = self._linear(b, ratio, peak, bits)
        else:
            quantized = self._log2(b, ratio, peak, bits)
        if keep:
            quantized = b.op("Concat", [self._columns(b, a, 0, 1), quantized], np.float32, attrs={"axis": -1})
        for consumer in consumers:
            for index, value in enumerate(consumer.inputs):
                if value is a:
                    consumer.inputs[index] = quantized

    @staticmethod
    def _linear(b: Builder, ratio: gs.Tensor, peak: gs.Tensor, bits: int) -> gs.Variable:
        top = np.float32(2**bits - 1)
        level = b.op("Clip", [b.op("Round", [b.op("Mul", [ratio, np.array(top)], np.float32)], np.float32),
                              np.array(0.0, np.float32), np.array(top)], np.float32)
        return b.op("Mul", [level, b.op("Div", [peak, np.array(top)], np.float32)], np.float32)

    @staticmethod
    def _log2(b: Builder, ratio: gs.Tensor, peak: gs.Tensor, bits: int) -> gs.Variable:
        exponent = b.op("Mul", [b.op("Log", [ratio], np.float32), np.array(-1.0 / math.log(2.0), np.float32)],
                        np.float32)
        level = b.op("Clip", [b.op("Round", [exponent], np.float32), np.array(0.0, np.float32),
                              np.array(2**bits - 1, np.float32)], np.float32)
        index = b.op("Cast", [level], np.int32, attrs={"to": onnx.TensorProto.INT32})
        power = b.op("Gather", [power_levels(bits), index], np.float32, attrs={"axis": 0})
        return b.op("Mul", [peak, power], np.float32)

    @staticmethod
    def _columns(b: Builder, a: gs.Tensor, start: int, end: int) -> gs.Variable:
        """A[..., start:end] along the key axis."""
        return b.op("Slice", [a, np.array([start], np.int64), np.array([end], np.int64), np.array([-1], np.int64)],
                    np.float32)
