"""Per-timestep and TDQ group tables on integer kernels: the scales each row's timestep gathers rescale int32 sums.

A GEMM Y = X·Ŵ (+ b), Ŵ = W_q·diag(s_w) with int8 W_q, reads X quantized with run-time parameters:
row b of the batch (timestep t_b) takes row i(t_b) of the plan's tables (``timestep_ranges.timestep_index``),
    s_k[b] = S[i(t_b), k],   z_k[b] = Z[i(t_b), k]        (k: the group of a channel or of a token)
    q = clamp(round(X/s) + z, q_min, q_max)              (uint8; QuantizeLinear along the row axis)
The scales vary per row, so they cannot sit inside the kernel's per-tensor grid; they go after it:
- channel groups (K ≥ 1; K = 1 is a per-tensor table, e.g. ``minmax --tdq``): X's channels sliced by group,
      Y[b] = Σ_k s_k[b]·( P_k[b] − z_k[b]·D_k ),   P_k = Σ_{j∈G_k} q_j·Ŵ[j, :],   D_k = Σ_{j∈G_k} Ŵ[j, :]
  P_k is one MatMulIntegerToFloat (uint8 × int8, exact int32 sums, s_w per column) per group; the
  zero-point term is Σ_k of the gathered s·z (B, K) times the constant D (K, N), per batch row.
- token groups (a (B, T, C) input, groups along T): (B·T, C) rows, one scale per row,
      Y[r] = s[r]·( P[r] − z[r]·D ),   one MatMulIntegerToFloat.
- Conv with channel groups: X padded with zeros first (a zero quantizes to code z exactly, so the
  padding is z and every window is full), then ConvInteger without padding per group:
      Y[b, o] = s_w[o]·Σ_k s_k[b]·( C_k[b, o] − z_k[b]·E_k[o] ) + bias,  E_k[o] = Σ_{c∈G_k, window} W_q[o, c]
Every form computes the simulated lowering's numbers (``timestep_ranges.simulated_timestep_qdq``
then the GEMM on Ŵ) with exact integer sums; only float rounding of the rescaling differs. Error
bound as there: |X − X̂| ≤ s_k(t)/2 inside the range tabled at t. Cost: K integer GEMMs over
channel slices (the same multiply-adds as one, K partial outputs), so DGQ's channel groups pay
for K; per-tensor tables and token groups pay one GEMM and two elementwise ops on its output
(``auto``, the ORT target's default, takes this form only where it measured faster: ``cost_reason``).
Not lowered here (simulated by the caller, with the reason): grouped or auto-padded Convs, weights
that are not a constant DequantizeLinear with zero point 0, Linears whose planned axis is not the
last one, plans with an empty group, int4 MatMulNBits (its kernel re-quantizes the input per block
at run time, so it runs on X̂). Conv pixel groups are refused by the simulated form too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.graph import constant_value
from qcompiler.errors import PassError
from qcompiler.grids import GroupPlan
from qcompiler.lowering.channel_affine import conv_padding, pad_input
from qcompiler.lowering.channel_groups import (
    Builder,
    conv_split_reason,
    group_slices,
    linear_weight,
    split_by_group,
    weight_dq,
)
from qcompiler.lowering.timestep_ranges import row_parameters, timestep_index

INTEGER = "integer GEMMs, run-time timestep scales on their sums"
#: "auto" lowers a reader to integer kernels only where that is also the faster form on ORT's CPU.
MODES = ("auto", "integer", "simulate")
#: auto: the smallest reduction width K at which one integer GEMM plus the rescale of its output
#: ties or beats Q/DQ plus a float GEMM: 0.87–1.03× at K = 96, 0.32–0.83× above, 1.03–1.20× at
#: K ≤ 64 (benchmarks/results/timestep_gemm_forms.md, one thread, an AMX-int8 CPU).
MIN_INTEGER_REDUCTION = 96
F32 = np.float32


def cost_reason(plan: GroupPlan, node: gs.Node) -> str | None:
    """Why ``auto`` keeps an integer-capable reader simulated (slower as integer on ORT's CPU), or None.

    Measured (benchmarks/results/timestep_lowering.md, timestep_gemm_forms.md; 1 thread): ConvInteger,
    the only ORT integer Conv that takes run-time scales, made the zoo UNet's one-group lookup 1.47×
    float against 1.12× simulated; 16 channel groups need 16 thin integer GEMMs per GEMM (6.49× float);
    below K = 96 input channels the output's rescale costs more than the integer GEMM saves."""
    if node.op == "Conv":
        return "ORT's ConvInteger (the integer Conv that takes run-time scales) is slower than the float Conv"
    if plan.axis == "channel" and plan.groups > 1:
        return f"{plan.groups} channel groups need {plan.groups} integer GEMMs, slower than one float GEMM"
    reduction = int(linear_weight(node).values.shape[0])
    if reduction < MIN_INTEGER_REDUCTION:
        return (f"K = {reduction} input channels: below {MIN_INTEGER_REDUCTION} the rescale of the integer GEMM's "
                "output costs more than the integer GEMM saves")
    return None


def integer_reason(plan: GroupPlan, x: gs.Tensor, node: gs.Node) -> str | None:
    """Why ``node`` (a reader of the planned tensor ``x``) cannot take the integer form, or None."""
    rank = len(x.shape) if x.shape else 0
    if node.op == "MatMulNBits":
        return "int4 weights: MatMulNBits re-quantizes its input per block at run time"
    if plan.axis == "channel" and np.bincount(plan.labels, minlength=plan.groups).min() == 0:
        return f"the plan of '{x.name}' has an empty group (no slice to run a GEMM on)"
    if node.op == "Conv":
        if plan.axis != "channel":
            return "Conv pixel groups: the scale changes inside each window"
        reason = conv_split_reason(node)
        if reason is None and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            reason = f"Conv '{node.name}' uses auto_pad={node.attrs['auto_pad']}"
        return reason
    weight = linear_weight(node)
    if isinstance(weight, str):
        return weight
    if weight.values.ndim != 2:
        return f"{node.op} '{node.name}' has a rank-{weight.values.ndim} weight"
    if plan.axis == "pixel":
        if rank != 3:
            return f"token groups need a (B, T, C) input; '{x.name}' has rank {rank}"
        if isinstance(x.shape[1], int) and x.shape[1] != plan.labels.size:
            raise PassError(f"per-timestep token groups of '{x.name}': its shape {x.shape} has {x.shape[1]} tokens, "
                            f"the plan {plan.labels.size} (the calibration's sequence length)")
        return None
    if rank < 2:
        return f"'{x.name}' has rank {rank}: no batch axis to gather the timestep's row by"
    if plan.channel_axis % rank != rank - 1:
        return f"{node.op} '{node.name}' reduces over the last axis, the plan groups axis {plan.channel_axis}"
    return None


class TimestepCodes:
    """The uint8 codes of one planned tensor and the gathered (s, z) of each row, built once per form."""

    def __init__(self, b: Builder, plan: GroupPlan, x: gs.Tensor, timestep: gs.Tensor):
        self.b, self.plan, self.x = b, plan, x
        index = timestep_index(b, timestep, plan.timesteps, x)
        groups = np.arange(plan.groups)
        # (B, K) when the groups are channels, (B, T) when they are tokens (one column per token).
        columns = plan.labels if plan.axis == "pixel" else groups
        self.scale = row_parameters(b, plan.timestep_scales, columns, index)
        zero = np.rint(plan.timestep_zero_points).astype(np.float32)
        self.zero = row_parameters(b, zero, columns, index)
        self._slices: dict[tuple, list[gs.Tensor]] = {}
        self._columns: dict[tuple, gs.Tensor] = {}
        self._zero_uint8: gs.Tensor | None = None

    def zero_uint8(self) -> gs.Tensor:
        if self._zero_uint8 is None:
            self._zero_uint8 = self.b.op("Cast", [self.zero], np.uint8, attrs={"to": onnx.TensorProto.UINT8})
        return self._zero_uint8

    def channel_slices(self, conv: bool = False, pads: list[int] | None = None) -> list[gs.Tensor]:
        """Codes of each channel group: axis −1 of a Linear input, or axis 1 of a Conv input padded
        with zeros by ``pads`` first."""
        key = ("conv", *(pads or ())) if conv else ("linear",)
        if key in self._slices:
            return self._slices[key]
        b, plan = self.b, self.plan
        axis = 1 if conv else len(self.x.shape) - 1
        source = pad_input(b, self.x, pads) if pads else self.x
        parts = split_by_group(b, plan, source, axis)
        codes = []
        for k, part in enumerate(parts):
            s_k, z_k = self.column("scale", k), self.column("zero", k)
            codes.append(b.narrow(b.op("QuantizeLinear", [part, s_k, z_k], np.uint8, attrs={"axis": 0}), plan.spec))
        self._slices[key] = codes
        return codes

    def token_rows(self, channels: int) -> gs.Tensor:
        """Codes of a (B, T, C) input with one (s, z) per token, as (B·T, C) rows."""
        if "tokens" not in self._slices:
            b = self.b
            rows = b.op("Reshape", [self.x, np.array([-1, channels], np.int64)], F32)
            flat = np.array([-1], np.int64)
            scale = b.op("Reshape", [self.scale, flat], F32)
            zero = b.op("Reshape", [self.zero_uint8(), flat], np.uint8)
            q = b.op("QuantizeLinear", [rows, scale, zero], np.uint8, attrs={"axis": 0})
            self._slices["tokens"] = [b.narrow(q, self.plan.spec)]
        return self._slices["tokens"][0]

    def column(self, which: str, k: int) -> gs.Tensor:
        """Group k's scale ("scale", float) or zero point ("zero", uint8) of every batch row, (B,)."""
        key = (which, k)
        if key not in self._columns:
            table, dtype = (self.scale, F32) if which == "scale" else (self.zero_uint8(), np.uint8)
            if self.plan.groups == 1:
                self._columns[key] = self.b.op("Reshape", [table, np.array([-1], np.int64)], dtype)
            else:  # a 0-d index: Gather drops the axis (ctx.constant would store it as shape (1,))
                index = gs.Constant(self.b.ctx.names.make(self.x.name, self.b.pass_name, "group"), np.array(k, np.int64))
                self._columns[key] = self.b.op("Gather", [table, index], dtype, attrs={"axis": 1})
        return self._columns[key]

    def row_scale(self, k: int, rank: int) -> gs.Tensor:
        """Group k's scale shaped (B, 1, …, 1) to multiply a rank-``rank`` GEMM output."""
        key = ("broadcast", k, rank)
        if key not in self._columns:
            shape = np.array([-1] + [1] * (rank - 1), np.int64)
            self._columns[key] = self.b.op("Reshape", [self.column("scale", k), shape], F32)
        return self._columns[key]


def lower_linear(codes: TimestepCodes, node: gs.Node) -> dict:
    """Replace MatMul/Gemm ``node`` by the channel- or token-group integer form (module docstring)."""
    b, plan, x = codes.b, codes.plan, codes.x
    weight = linear_weight(node)
    output = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    rank = len(x.shape)
    w_scale = weight.scale.astype(F32)
    if plan.axis == "pixel":
        sums = _integer_gemm(b, codes.token_rows(weight.values.shape[0]), weight.values, w_scale)           # (B·T, N)
        column = np.array([-1, 1], np.int64)
        scale = b.op("Reshape", [codes.scale, column], F32)
        shift = b.op("Mul", [b.op("Reshape", [codes.zero, column], F32),
                             (weight.values.astype(np.int64).sum(axis=0) * w_scale).astype(F32)], F32)
        flat = b.op("Mul", [b.op("Sub", [sums, shift], F32), scale], F32)
        lead = b.op("Slice", [b.op("Shape", [x], np.int64), np.array([0], np.int64), np.array([-1], np.int64)],
                    np.int64)
        shape = b.op("Concat", [lead, np.array([weight.values.shape[1]], np.int64)], np.int64, attrs={"axis": 0})
        result = b.op("Reshape", [flat, shape], F32)
    else:
        slices = group_slices(plan)
        partials = []
        for k, (channels, q) in enumerate(zip(slices, codes.channel_slices())):
            sums = _integer_gemm(b, q, weight.values[channels], w_scale)
            partials.append(b.op("Mul", [sums, codes.row_scale(k, rank)], F32))
        result = _minus_zero_term(b, codes, partials, _group_sums(weight.values, slices) * w_scale, rank)
    if weight.bias is not None:
        result = b.op("Add", [result, weight.bias.astype(F32)], F32)
    b.op("Identity", [result], F32, outputs=[output])
    return {"kernel": "MatMulIntegerToFloat", "integer_gemms": 1 if plan.axis == "pixel" else plan.groups}


def lower_conv(codes: TimestepCodes, node: gs.Node) -> dict:
    """Replace Conv ``node`` by padded codes and one ConvInteger per channel group (module docstring)."""
    b, plan = codes.b, codes.plan
    values, w_scale, _ = weight_dq(node)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    out_channels, spatial = values.shape[0], values.ndim - 2
    attrs = {k: v for k, v in node.attrs.items() if k in ("dilations", "kernel_shape", "strides")}
    pads = conv_padding(node) or []
    output = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    slices = group_slices(plan)
    partials = []
    for k, (channels, q) in enumerate(zip(slices, codes.channel_slices(conv=True, pads=pads))):
        # uint8 weights W_q + 128 with zero point 128: the same exact sums, and ORT's ConvInteger runs its
        # u8×u8 kernel 4× faster than u8×s8 (4.9 vs 19.2 ms on a (32, 64, 16, 16) 3×3 Conv, 1 thread:
        # benchmarks/results/conv_integer_weights.md).
        shifted = (values[:, channels].astype(np.int16) + 128).astype(np.uint8)
        sums = b.cast_float(b.op("ConvInteger", [q, shifted, np.array(0, np.uint8), np.array(128, np.uint8)],
                                 np.int32, attrs=attrs))
        partials.append(b.op("Mul", [sums, codes.row_scale(k, 2 + spatial)], F32))
    window_sums = np.stack([values[:, channels].astype(np.int64).sum(axis=tuple(range(1, values.ndim)))
                            for channels in slices])                                   # (K, O)
    inner = _minus_zero_term(b, codes, partials, window_sums.astype(F32), 2 + spatial, channel_axis=1)
    column_shape = (1, out_channels) + (1,) * spatial
    result = b.op("Mul", [inner, w_scale.astype(F32).reshape(column_shape)], F32)
    if bias is not None:
        result = b.op("Add", [result, bias.astype(F32).reshape(column_shape)], F32)
    b.op("Identity", [result], F32, outputs=[output])
    return {"kernel": "ConvInteger", "integer_gemms": plan.groups}


def _integer_gemm(b: Builder, codes: gs.Tensor, values: np.ndarray, w_scale: np.ndarray) -> gs.Tensor:
    """MatMulIntegerToFloat(codes, W_q; a_scale 1, b_scale s_w): exact int32 sums times s_w per column."""
    return b.op("MatMulIntegerToFloat", [codes, np.ascontiguousarray(values, np.int8), np.array(1.0, F32),
                                         w_scale], F32, domain="com.microsoft")


def _group_sums(values: np.ndarray, slices: list[np.ndarray]) -> np.ndarray:
    """(K, N): Σ_{j∈G_k} W_q[j, n] of a [C, N] integer weight."""
    return np.stack([values[channels].astype(np.int64).sum(axis=0) for channels in slices]).astype(F32)


def _minus_zero_term(b: Builder, codes: TimestepCodes, partials: list[gs.Tensor], group_sums: np.ndarray,
                     rank: int, channel_axis: int = -1) -> gs.Tensor:
    """Σ_k partials − (s·z)(B, K)·group_sums(K, N), the second broadcast back to the output's rank."""
    b = codes.b
    total = partials[0] if len(partials) == 1 else b.op("Sum", partials, F32)
    # (B, K, 1)·(K, N) summed over K: a float MatMul would do it too, but count as a float GEMM.
    shifted = b.op("Unsqueeze", [b.op("Mul", [codes.scale, codes.zero], F32), np.array([2], np.int64)], F32)
    term = b.op("ReduceSum", [b.op("Mul", [shifted, group_sums], F32), np.array([1], np.int64)], F32,
                attrs={"keepdims": 0})                                                   # (B, N)
    shape = [0] + [1] * (rank - 1)
    shape[channel_axis] = -1
    return b.op("Sub", [total, b.op("Reshape", [term, np.array(shape, np.int64)], F32)], F32)
