"""What the quantizing passes decide, recorded on the compile context for the target to lower.

Passes decide *grids* (bits, granularity, scales and zero points, group plans); a target
(``qcompiler.targets``) decides which ops its runtime runs them with. The records here are the
hand-over between the two:

- ``GroupPlan`` (``ctx.group_plans``, written by ``dgq_groups``): DGQ groups of one activation.
- ``OutputGrid`` (``ctx.output_grids``, written by ``insert_activation_qdq``): the per-tensor grid
  of a quantized Conv's output. Not every runtime needs it; ORT fuses DQ → Conv → Q into
  QLinearConv only when the output is quantized, so the ORT target inserts it.
- ``DynamicGroupPlan`` (``ctx.dynamic_group_plans``, written by ``qdit_groups``): Q-DiT's group-wise
  weights and per-token, per-group activations of one Linear (ranges at run time or calibrated).
- ``WeightRule`` (``ctx.weight_rules``, written by ``quantize_weights``): how a GEMM's weight grid
  was chosen, so a lowering that rescales the weight rows (DGQ's channel affine) can re-derive
  the grid by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.quant import QuantSpec

_WEIGHT_DQ_GEMMS = ("MatMul", "Gemm", "Conv")


@dataclass(eq=False)
class GroupPlan:
    """How one activation is grouped: ``labels`` per index of ``axis``, parameters per group."""

    tensor: str
    axis: str  # "channel" | "pixel": the axis the groups run along
    channel_axis: int  # the tensor's channel axis (-1 for Linear inputs, 1 for Conv inputs)
    labels: np.ndarray = field(repr=False)
    scales: np.ndarray = field(repr=False)
    zero_points: np.ndarray = field(repr=False)
    #: Each group's calibrated range (before ``scale_zero_point`` widens it to include 0).
    group_min: np.ndarray = field(repr=False)
    group_max: np.ndarray = field(repr=False)
    bits: int
    d_channel: float
    d_pixel: float
    #: Per-timestep parameters (``per_timestep``): calibrated t (T,), S and Z (T, K); else None.
    timesteps: np.ndarray | None = field(default=None, repr=False)
    timestep_scales: np.ndarray | None = field(default=None, repr=False)
    timestep_zero_points: np.ndarray | None = field(default=None, repr=False)
    timestep_input: str = "timestep"
    #: Where the per-timestep parameters come from: "lookup" (calibrated t, nearest) or "tdq" (every t).
    timestep_method: str = "lookup"
    #: Calibrated mean per channel (channel groups; None where unknown): the lowering's bias correction.
    channel_mean: np.ndarray | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        return int(self.scales.size)

    @property
    def d_star(self) -> str:
        return "channel" if self.d_channel >= self.d_pixel else "pixel"

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=False)

    def element_scale(self) -> np.ndarray:
        """s per index of the grouped axis (the full-length vector with K distinct values)."""
        return self.scales[self.labels]

    def element_zero_point(self) -> np.ndarray:
        return self.zero_points[self.labels]

    def details(self) -> dict:
        details = {"D_channel": self.d_channel, "D_pixel": self.d_pixel, "d_star": self.d_star,
                   "group_axis": self.axis, "groups": self.groups}
        if self.timesteps is not None:
            details["per_timestep"] = int(self.timesteps.size)
            details["timestep_method"] = self.timestep_method
        return details



@dataclass(frozen=True)
class OutputGrid:
    """Per-tensor grid of a GEMM output (asymmetric, ``bits`` wide), from calibration."""

    tensor: str
    node: str
    scale: float
    zero_point: int
    spec: QuantSpec
    calibrated_min: float
    calibrated_max: float
    samples: int


@dataclass(frozen=True, eq=False)
class DynamicGroupPlan:
    """One Linear's Q-DiT grid: input channels in groups of ``group`` (``paper_group`` at DiT-XL scale);
    weights symmetric int``wbits`` per (group, output column); activations asymmetric int``abits`` per
    (token, group), ranges computed at run time, or ``static`` (s, z), each (1, G, 1), from calibration."""

    node: str
    tensor: str
    group: int
    paper_group: int
    abits: int
    wbits: int
    static: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def details(self) -> dict[str, Any]:
        return {"group_size": self.group, "paper_group_size": self.paper_group,
                "ranges": "calibrated per group" if self.static is not None else "run time per token and group"}


@dataclass(frozen=True, eq=False)
class WeightRule:
    """How ``quantize_weights`` chose a weight's scales: bits, block size (int4 MatMul) and clip ratios.

    ``clip_ratios`` empty means min/max (s = max|W|/q_max); otherwise the MSE clip search over them.
    ``source`` is the float weight the grid was computed from (the array the graph already held, not
    a copy), so a lowering that rescales rows quantizes diag(r)·W once instead of re-rounding Ŵ; the
    target drops it after lowering.
    """

    bits: int
    block_size: int | None = None
    clip_ratios: tuple[float, ...] = ()
    source: np.ndarray | None = field(default=None, repr=False)

    def details(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "clip_search": bool(self.clip_ratios)}


def quantized_gemms(graph: gs.Graph) -> list[gs.Node]:
    """GEMMs whose weight is already integer: DQ-fed MatMul/Gemm/Conv, and MatMulNBits."""
    found = []
    for node in graph.nodes:
        if node.op == "MatMulNBits":
            found.append(node)
        elif node.op in _WEIGHT_DQ_GEMMS and len(node.inputs) > 1:
            producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
            if producer is not None and producer.op == "DequantizeLinear":
                found.append(node)
    return found
