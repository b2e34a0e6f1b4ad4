"""Activation Q/DQ made symmetric (int8, zero point 0): an exact shift where a producer takes it, else a wider range.

A per-tensor activation grid (s, z) on uint8 covers [lo, hi] = [s·(0 − z), s·(255 − z)]. A runtime that
allows only zero point 0 (TensorRT: int8 activations on [−128, 127]) gets one of:
- the shift form, the same grid moved: with c = s·(128 − z) the GEMM reads
      X' = X − c  on  s, z = 0:   round(X'/s) = round(X/s) + z − 128,   GEMM(X) = GEMM(X') + c·Σ_k Ŵ[k, n]
  so the int8 code is the uint8 code − 128: the same 256 levels, and X = 0 stays a grid point (a
  shift by the range's centre would put 0 up to half a step off the grid; on MiniLM osplus that cost
  1.4 dB, because the many channels whose values sit within a step of 0 then round to ±s/2 instead
  of 0). c is subtracted from the producer's bias or affine (LayerNorm β, a constant Add, Conv/Gemm C)
  and c·Σ_k Ŵ[k, n] is added to each reading GEMM's bias. The producer takes it only when every value
  reader of X is one of these GEMMs (no one else may see X − c). Where no producer takes it, an
  explicit Sub(c) read only by the QuantizeLinear does (one pointwise op, which TensorRT fuses into
  the Q's kernel; other readers of X still read X).
- the covering form, for GEMMs that cannot take a correction (a padded Conv: a padded 0 of X' would
  stand for X = c), and wherever it costs at most one level in 127 (z within 1 of 128: no Sub, no
  bias change): s' = max(−lo/128, hi/127), z = 0, at most one bit coarser; 0 is on the grid.
Error bound: |X − X̂| ≤ s'/2 inside [lo, hi] in both forms. Below 8 bits the narrowing Clip goes and
the grid gets 8 bits over the same range: the int8 kernel runs 8 bits anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.folding import absorb_into_norm
from qcompiler.graph import constant_value
from qcompiler.lowering.channel_affine import (
    add_output_bias,
    output_correction,
    weight_in_axis,
)
from qcompiler.lowering.channel_groups import Builder

INT8_MIN, INT8_MAX = -128, 127
#: The covering form is kept where its step is at most this factor of the shifted grid's (z within 1
#: of 128: 0.07 dB on that tensor), which saves the Sub and the bias change.
COVERING_SLACK = 128 / 127
#: Ops that read only the shape of a tensor: a shifted X does not change what they compute.
SHAPE_ONLY = ("Shape", "Size")
#: A GEMM's data input (index 0) that a shift's correction can be folded behind.
GEMMS = ("MatMul", "Gemm", "Conv", "MatMulNBits")


@dataclass(frozen=True)
class ActivationPair:
    """A per-tensor activation QuantizeLinear and its DequantizeLinear readers."""

    quantize: gs.Node
    dequantize: tuple[gs.Node, ...]
    source: gs.Tensor  # the float tensor before any narrowing Clip
    low: float
    high: float
    bits: int

    @property
    def tensor(self) -> gs.Tensor:
        return self.quantize.inputs[0]


def activation_pairs(graph: gs.Graph) -> list[ActivationPair]:
    """Every per-tensor Q on a non-constant tensor whose readers are all DequantizeLinear, with its range."""
    pairs = []
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        readers = list(node.outputs[0].outputs)
        scale = constant_value(node.inputs[1])
        zero = constant_value(node.inputs[2]) if len(node.inputs) > 2 else np.zeros((), np.uint8)
        if not readers or any(r.op != "DequantizeLinear" for r in readers) or scale is None or scale.size != 1 \
                or zero is None or zero.size != 1:
            continue
        if zero.dtype == np.int8 and not np.any(zero):
            continue  # already symmetric int8 (a target's own lowering made it)
        limits, offset = np.iinfo(zero.dtype), int(np.reshape(zero, ()))
        scale = float(np.reshape(scale, ()))
        low, high, bits, source = scale * (limits.min - offset), scale * (limits.max - offset), 8, node.inputs[0]
        clip = source.inputs[0] if source.inputs else None
        if clip is not None and clip.op == "Clip" and "narrows" in (getattr(clip, "doc_string", "") or ""):
            low, high = (float(np.reshape(constant_value(t), -1)[0]) for t in clip.inputs[1:3])
            bits, source = round(np.log2((high - low) / scale + 1)), clip.inputs[0]
        pairs.append(ActivationPair(node, tuple(readers), source, low, high, bits))
    return pairs


def _value_readers(tensor: gs.Tensor) -> list[gs.Node]:
    return [n for n in tensor.outputs if n.op not in SHAPE_ONLY]


def _gemm_readers(pair: ActivationPair) -> list[gs.Node] | None:
    """The GEMMs that read the pair's DQ outputs at their data input, or None if anything else reads them."""
    readers = []
    for dq in pair.dequantize:
        for reader in dq.outputs[0].outputs:
            if reader.op not in GEMMS or reader.inputs[0] is not dq.outputs[0] or dq.outputs[0] in reader.inputs[1:]:
                return None
            weight = reader.inputs[1].inputs[0] if reader.inputs[1].inputs else None
            if reader.op != "MatMulNBits" and (weight is None or weight.op != "DequantizeLinear"
                                               or "block_size" in weight.attrs):
                return None  # the correction c·ΣŴ needs the per-channel integer weight
            readers.append(reader)
    return readers


def _padded(node: gs.Node) -> bool:
    return node.op == "Conv" and (any(int(p) for p in node.attrs.get("pads", []))
                                  or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"))


def _subtract_from_producer(ctx: CompileContext, pair: ActivationPair, shift: float, pass_name: str) -> str | None:
    """Make the producer of X write X − c; returns what took it, or None (nothing changed)."""
    x = pair.source
    producer = x.inputs[0] if x.inputs else None
    if producer is None or x in ctx.graph.outputs:
        return None
    if producer.op in ("LayerNormalization", "Add", "Mul"):  # Norm affine (LayerNorm or its Mul+Add form)
        channels = x.shape[-1] if x.shape and isinstance(x.shape[-1], int) else None
        if channels:
            taken = absorb_into_norm(ctx, x, [pair.quantize], np.ones(channels), np.full(channels, shift), pass_name)
            if taken:
                return taken
    if producer.op == "Add":  # Y = A + b with b constant: b − c
        for index, operand in enumerate(producer.inputs):
            value = constant_value(operand)
            if value is not None and value.dtype == np.float32 and not isinstance(producer.inputs[1 - index], gs.Constant):
                producer.inputs[index] = ctx.constant(ctx.names.make(operand.name, pass_name, "shifted"),
                                                      (value.astype(np.float64) - shift).astype(np.float32))
                return f"the constant of Add '{producer.name}'"
    if producer.op in ("Conv", "Gemm") and len(producer.inputs) > 2:
        bias = constant_value(producer.inputs[2])
        beta = float(producer.attrs.get("beta", 1.0)) if producer.op == "Gemm" else 1.0
        if bias is not None and beta != 0.0:
            producer.inputs[2] = ctx.constant(ctx.names.make(producer.inputs[2].name, pass_name, "shifted"),
                                              (bias.astype(np.float64) - shift / beta).astype(np.float32))
            return f"the bias of {producer.op} '{producer.name}'"
    return None


def make_symmetric(ctx: CompileContext, pair: ActivationPair, pass_name: str) -> dict:
    """Rewrite one pair to int8 zero point 0 (shift form where it is exact, else covering); its record."""
    if pair.tensor is not pair.source:  # drop the narrowing Clip: 8 bits over the same range
        clip = pair.tensor.inputs[0]
        pair.quantize.inputs[0] = pair.source
        clip.inputs.clear()
        clip.outputs.clear()
    low, high = min(pair.low, 0.0), max(pair.high, 0.0)
    step, shift = int8_grid(low, high)
    covering = max(-low / -INT8_MIN, high / INT8_MAX)
    how, gemms = None, _gemm_readers(pair)
    worth = covering > step * COVERING_SLACK * (1 + 1e-6)
    if worth and gemms and not any(_padded(g) for g in gemms) \
            and [id(n) for n in _value_readers(pair.source)] == [id(pair.quantize)]:
        how = _subtract_from_producer(ctx, pair, shift, pass_name)
    b = Builder(ctx, pass_name, pair.source.name, "symmetric int8 activation (TensorRT: zero point 0)")
    quantized_input = pair.source
    if how is None and worth and gemms and not any(_padded(g) for g in gemms):
        # No producer takes X − c: an explicit Sub read only by this Q (a pointwise op TensorRT fuses
        # into the Q's kernel); other readers of X still read X.
        shift = float(np.float32(shift))
        quantized_input = b.op("Sub", [pair.source, np.array(shift, np.float32)], np.float32)
        how = "an explicit Sub before the QuantizeLinear"
        ctx.fallbacks.append(f"{pass_name}: '{pair.source.name}' shifted by {shift:.6g} with an explicit Sub before "
                             "its symmetric QuantizeLinear (no producer bias/affine could take it)")
    if how is not None:
        for gemm in gemms:
            k = int(gemm.attrs["K"]) if gemm.op == "MatMulNBits" else _input_channels(gemm)
            add_output_bias(b, gemm, output_correction(gemm, np.full(k, shift)))
        if quantized_input is pair.source:
            ctx.rescaled_tensors.add(pair.source.name)
        scale = step
    else:
        shift, scale = 0.0, covering
    scale = np.float32(max(scale, np.finfo(np.float32).tiny))
    scale_c, zero_c = b.const("scale", np.array(scale, np.float32)), b.const("zero_point", np.array(0, np.int8))
    set_inputs(pair.quantize, [quantized_input, scale_c, zero_c])
    pair.quantize.outputs[0].dtype = np.int8
    for dq in pair.dequantize:
        set_inputs(dq, [dq.inputs[0], scale_c, zero_c])
    return {"scale": float(scale), "zero_point": 0, "form": "shift" if how else "covering", "shift": float(shift),
            "shift_into": how, "range": [pair.low, pair.high], "bits_replaced": pair.bits if pair.bits < 8 else None}


def int8_grid(low: float | np.ndarray, high: float | np.ndarray):
    """(s, c): the uint8 grid over [lo, hi] (lo ≤ 0 ≤ hi), s = (hi − lo)/255 and z = round(−lo/s), as int8
    zero point 0 after the shift c = s·(128 − z): X − c spans [−128·s, 127·s] and X = 0 is a grid point."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    step = np.maximum((high - low) / 255.0, float(np.finfo(np.float32).tiny))
    step = step.astype(np.float32).astype(np.float64)  # the stored scale: c is a whole number of its steps
    zero = np.clip(np.rint(-low / step), 0, 255)
    shift = step * (-INT8_MIN - zero)
    return (float(step), float(shift)) if step.ndim == 0 else (step, shift)


def _input_channels(gemm: gs.Node) -> int:
    weight = gemm.inputs[1]
    shape = weight.shape if weight.shape else (weight.inputs[0].inputs[0].shape if weight.inputs else None)
    if shape is None or not isinstance(shape[weight_in_axis(gemm)], int):
        value = weight.inputs[0].inputs[0] if weight.inputs else weight
        shape = constant_value(value).shape
    return int(shape[weight_in_axis(gemm)])


def set_inputs(node, values) -> None:
    """Replace a node's inputs one by one (onnx-graphsurgeon's lists keep tensor links in sync per item)."""
    for index, value in enumerate(values):
        if index < len(node.inputs):
            node.inputs[index] = value
        else:
            node.inputs.append(value)
