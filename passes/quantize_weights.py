"""Pass ``quantize_weights``: replace each Linear/Conv weight by integer weights and their scales.

Rewrite (W8):  W → DequantizeLinear(W_q, s_w, 0, axis=out),  W_q = clamp(round(W/s_w), −127, 127),
               s_w[n] = max_k |W[k, n]| / 127   (symmetric per output channel)
Rewrite (W4, MatMul):  MatMul(X, W) → MatMulNBits(X, pack(W_q), s_w, block_size, accuracy_level=4),
               W_q = clamp(round(W/s_w), −7, 7),  s_w[n, b] = max_{k ∈ block b} |W[k, n]| / 7
W4 Conv/Gemm weights (no blocked DQ below opset 21): int4 values per output channel in an int8
container. Error bound: |W − Ŵ| ≤ s_w/2 element-wise (rounding inside the symmetric range).
Option ``clip_search`` (MSE clip search, docs/algorithms.md §3): per output channel (or block)
s_w = r*·max|W|/qmax with r* = argmin_{r ∈ clip_ratios} ‖W − Ŵ_r‖² (r = 1 is min/max; values
beyond r·max|W| clip to ±qmax).
Option ``gptq`` (qcompiler/gptq.py, for weights of at most ``gptq_max_bits``): GPTQ's error feedback
on H = XᵀX of the calibration inputs instead of rounding to nearest, per block (MatMulNBits) or per
output channel (Conv im2col, Gemm), scales by the same rule; H from the float model's inputs.
Per-GEMM widths: a GEMM named in ``ctx.weight_bits`` (``mixed_precision``) gets those bits instead
of ``--wbits`` (a W8 MatMul in a W4 compile: int8 per output channel, not MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qcompiler.context import CompileContext, QuantRecord
from qcompiler.grids import WeightRule
from qcompiler.lowering.matmul_nbits import dequantize_matmul_nbits, pack_matmul_nbits, quantize_int4_blocks
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.patterns import Conv, Linear, find_convs, find_linears, weight_array
from qcompiler.quant import QuantSpec, dequantize, quantize_weight
from qcompiler.skeleton import fresh_map
from qcompiler.weight_quant import DEFAULT_CLIP_RATIOS, quantize_weight_clipped


@dataclass(frozen=True)
class QuantizeWeightsConfig:
    include_conv: bool = True
    include_linear: bool = True
    exclude_nodes: tuple[str, ...] = ()
    #: MatMulNBits compute: 4 = int8 GEMM with A quantized per block at run time; 0 = float (exactness tests).
    nbits_accuracy_level: int = 4
    #: MSE clip search of each weight scale over ``clip_ratios`` (else min/max) ...
    clip_search: bool = False
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS
    #: ... for weights of at most this many bits (dgq: 4, int4 only; dmq: 8, every weight).
    clip_search_max_bits: int = 8
    #: GPTQ error feedback (qcompiler/gptq.py) for weights of at most ``gptq_max_bits``: damping
    #: λ = gptq_damp·mean(diag H), lazy updates in blocks of ``gptq_block`` columns, H from
    #: ``gptq_rows`` input rows of each of ``gptq_batches`` calibration batches (spread evenly).
    gptq: bool = False
    gptq_max_bits: int = 4
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_batches: int = 8
    gptq_rows: int = 2048
    #: Clear the calibration statistics cached before this pass, so later passes (activation QDQ)
    #: calibrate on the weight-quantized graph, as they do when nothing was cached. Off: ranges
    #: cached on the float graph (OS+/SmoothQuant's pass, kept across their folds) are reused, one
    #: forward pass fewer, as ORT's quantize_static calibrates (the float model). Measured on the zoo
    #: (docs/algorithms.md §5.1): on, digits_vit osplus 20.73 dB; off, 20.62 dB.
    recalibrate: bool = False

    def __post_init__(self):
        if self.clip_search and (not self.clip_ratios or not all(0 < r <= 1 for r in self.clip_ratios)):
            raise ValueError(f"QuantizeWeightsConfig: clip_ratios must be in (0, 1], got {self.clip_ratios}")


def uses_clip_search(config: QuantizeWeightsConfig, bits: int) -> bool:
    return config.clip_search and bits <= config.clip_search_max_bits


def quantize_weight_as(w: np.ndarray, spec: QuantSpec, config: QuantizeWeightsConfig):
    """``quantize_weight`` or, with ``config.clip_search`` at these bits, ``quantize_weight_clipped``."""
    if uses_clip_search(config, spec.bits):
        return quantize_weight_clipped(w, spec, config.clip_ratios)
    return quantize_weight(w, spec)


def uses_nbits(unit: Linear | Conv, bits: int) -> bool:
    """Whether this GEMM's weight becomes MatMulNBits blocks (int4 MatMul) rather than a DequantizeLinear."""
    return bits == 4 and isinstance(unit, Linear) and unit.node.op == "MatMul"


def int4_blocks(weight: np.ndarray, block: int, config: QuantizeWeightsConfig) -> tuple[np.ndarray, np.ndarray]:
    """int4 values [N, K] and scales [N, K/block] of a MatMul weight [K, N] (clip-searched if configured)."""
    if uses_clip_search(config, 4):
        spec = QuantSpec(bits=4, symmetric=True, granularity="block", axis=1, block_size=block)
        q, scales, _ = quantize_weight_clipped(np.ascontiguousarray(weight.T), spec, config.clip_ratios)
        return q, scales
    return quantize_int4_blocks(weight, block)


def simulated_weight(unit: Linear | Conv, weight: np.ndarray, bits: int, block: int,
                     config: QuantizeWeightsConfig) -> np.ndarray:
    """Ŵ: the float weight the quantized GEMM computes with, on the grid this pass would write."""
    if uses_nbits(unit, bits):
        q, scales = int4_blocks(weight, block, config)
        return dequantize_matmul_nbits(q, scales, block)
    spec = QuantSpec(bits=bits, symmetric=True, granularity="axis", axis=unit.weight_out_axis)
    q, scale, zero_point = quantize_weight_as(weight, spec, config)
    return dequantize(q, scale, zero_point, axis=unit.weight_out_axis).astype(np.float32)


def _release_pages(unit: Linear | Conv) -> None:
    """The float weight was read in full and is no longer used by this GEMM: a fresh map of it
    (for any other reader) lets the pages just read leave the resident set now, not at cleanup;
    without this a 2.4 GB transformer holds every float page until the pass ends."""
    if isinstance(unit.weight, gs.Constant):
        unit.weight.values = fresh_map(unit.weight.values)


class QuantizeWeights(Pass):
    """Integer weights per output channel (int8) or per block (int4); see the module docstring."""

    name = "quantize_weights"
    Config = QuantizeWeightsConfig

    def requires(self, ctx: CompileContext) -> None:
        if self.config.gptq:
            self.require_calibration(ctx, "for GPTQ's Hessians (quantize_weights.gptq)")

    def _hessians(self, ctx: CompileContext, units: list[Linear | Conv]) -> dict[str, np.ndarray]:
        """GPTQ's XᵀX per GEMM whose weight gets at most ``gptq_max_bits``; empty without ``gptq``."""
        if not self.config.gptq:
            return {}
        from qcompiler.gptq import collect_hessians
        from qcompiler.calibration.readers import spread_batches

        chosen = [u for u in units if ctx.weight_bits.get(u.node.name, ctx.settings.wbits) <= self.config.gptq_max_bits]
        batches = spread_batches(ctx.calibration, self.config.gptq_batches)
        return collect_hessians(ctx, chosen, batches, self.config.gptq_rows) if chosen else {}

    def _gptq(self, weight_nk: np.ndarray, hessian: np.ndarray, bits: int, group: int | None):
        from qcompiler.gptq import gptq_quantize

        ratios = self.config.clip_ratios if uses_clip_search(self.config, bits) else ()
        return gptq_quantize(weight_nk, hessian, bits, group, self.config.gptq_block, self.config.gptq_damp, ratios)

    def call(self, ctx: CompileContext) -> PassResult:
        units: list[Linear | Conv] = []
        if self.config.include_linear:
            units += find_linears(ctx.graph)
        if self.config.include_conv:
            units += find_convs(ctx.graph)
        units = [u for u in units if u.node.name not in self.config.exclude_nodes
                 and u.node.name not in ctx.dynamic_group_plans]
        self.hessians = self._hessians(ctx, units)
        changed = 0
        # tqdm shows itself on a terminal only; an SD-1.5 UNet's 282 weights take ~12 s.
        for unit in tqdm(units, desc="quantizing weights", unit="weight", leave=False, disable=None):
            # (excluded nodes and those planned group-wise by qdit_groups were dropped above)
            bits = ctx.weight_bits.get(unit.node.name, ctx.settings.wbits)
            if uses_nbits(unit, bits):
                self._lower_matmul_nbits(ctx, unit)
            else:
                self._insert_weight_dq(ctx, unit, bits)
            _release_pages(unit)
            changed += 1
        ctx.graph.cleanup().toposort()
        if self.config.recalibrate and changed:
            ctx.invalidate_statistics()
        return PassResult(changed > 0, (f"quantized {changed} weights",))

    def _rule(self, ctx: CompileContext, bits: int, block_size: int | None, source: np.ndarray,
              gptq: bool = False) -> WeightRule:
        ratios = self.config.clip_ratios if uses_clip_search(self.config, bits) else ()
        if gptq:  # no source: a lowering that rescales rows re-rounds Ŵ (GPTQ's codes) rather than W
            return WeightRule(bits, block_size, tuple(ratios), None)
        # A lowering may re-quantize from the float weight (DGQ's affine). A memory-mapped one
        # was just read in full: a fresh map holds no resident pages. A folded one (W' = s·W, in
        # memory) is spilled to a scratch file: either way it costs no memory until read again.
        return WeightRule(bits, block_size, tuple(ratios), ctx.spill(fresh_map(source)))

    def _insert_weight_dq(self, ctx: CompileContext, unit: Linear | Conv, bits: int) -> None:
        weight = weight_array(unit)
        spec = QuantSpec(bits=bits, symmetric=True, granularity="axis", axis=unit.weight_out_axis)
        hessian = self.hessians.get(unit.node.name)
        if hessian is not None:
            moved = np.moveaxis(weight, unit.weight_out_axis, 0)
            codes, scale = self._gptq(moved.reshape(moved.shape[0], -1), hessian, bits, None)
            q = np.ascontiguousarray(np.moveaxis(codes.reshape(moved.shape), 0, unit.weight_out_axis))
            zero_point = np.zeros(scale.shape, spec.container)
        else:
            q, scale, zero_point = quantize_weight_as(weight, spec, self.config)
        base = unit.weight.name
        names = ctx.names
        dq_out = gs.Variable(names.make(base, self.name, "dequantized"), dtype=np.float32, shape=list(weight.shape))
        dq = gs.Node("DequantizeLinear", names.make(base, self.name, "DequantizeLinear"),
                     attrs={"axis": unit.weight_out_axis},
                     inputs=[ctx.constant(names.make(base, self.name, "int8"), q),
                             ctx.constant(names.make(base, self.name, "scale"), scale),
                             ctx.constant(names.make(base, self.name, "zero_point"), zero_point)],
                     outputs=[dq_out])
        rule = "MSE clip search" if uses_clip_search(self.config, spec.bits) else f"max|W|/{spec.qmax}"
        rule += ", GPTQ rounding" if hessian is not None else ""
        dq.doc_string = (f"qcompile {self.name}: {spec.describe()} weight of {unit.node.op} "
                         f"'{unit.node.name}', scale = {rule} per output channel")
        ctx.graph.nodes.append(dq)
        unit.node.inputs[1] = dq_out
        lowering = f"int8 container, int{bits} values (per-channel)" if bits < 8 else "DequantizeLinear"
        details = {"mixed_precision": f"kept at W{bits}"} if bits != ctx.settings.wbits else {}
        ctx.records.append(QuantRecord(unit.node.name, base, "weight", spec.describe(), lowering, self.name,
                                       details))
        ctx.weight_rules[unit.node.name] = self._rule(ctx, spec.bits, None, weight, hessian is not None)

    def _lower_matmul_nbits(self, ctx: CompileContext, unit: Linear) -> None:
        weight = weight_array(unit)
        block = ctx.settings.block_size
        hessian = self.hessians.get(unit.node.name)
        if hessian is not None:
            q, scales = self._gptq(np.ascontiguousarray(weight.T), hessian, 4, block)
        else:
            q, scales = int4_blocks(weight, block, self.config)
        k, n = weight.shape
        base = unit.weight.name
        names = ctx.names
        node = gs.Node("MatMulNBits", names.make(unit.node.name, self.name, "MatMulNBits"), domain="com.microsoft",
                       attrs={"K": k, "N": n, "bits": 4, "block_size": block,
                              "accuracy_level": self.config.nbits_accuracy_level},
                       inputs=[unit.input, ctx.constant(names.make(base, self.name, "int4_packed"),
                                                        pack_matmul_nbits(q, block)),
                               ctx.constant(names.make(base, self.name, "scale"),
                                            scales.astype(np.float32).reshape(-1))],
                       outputs=list(unit.node.outputs))
        node.doc_string = (f"qcompile {self.name}: int4 sym block({block}) weight of MatMul '{unit.node.name}'; "
                           "accuracy_level=4: activations quantized to int8 per block at run time")
        unit.node.outputs.clear()
        ctx.graph.nodes.append(node)
        spec = QuantSpec(bits=4, symmetric=True, granularity="block", axis=0, block_size=block)
        ctx.records.append(QuantRecord(node.name, base, "weight", spec.describe(), "MatMulNBits", self.name))
        ctx.weight_rules[node.name] = self._rule(ctx, 4, block, weight, hessian is not None)
        if not any(domain.domain == "com.microsoft" for domain in ctx.template.opset_import):
            ctx.template.opset_import.add(domain="com.microsoft", version=1)
