"""Activation outliers (Systematic Outliers, seed 000) and DGQ's distribution view, per watched tensor.

For a tensor h over the whole calibration set (N values, C channels, P positions per sample):

    mean|h| = (1/N) Σ |h|                      (pass 1, TensorStats.mean_abs)
    outlier  ⇔ |h_ij| > τ · mean|h|            (τ = 64 by default; the paper's code uses 1000 on LLaMA)
    max/mean = max|h| / mean|h|

Pass 2 counts the outliers per channel, per position (token or pixel) and, when the model has
a token-id input, per token id, and accumulates Σ h² per channel and per position for the
quantization-error estimates in ``recommend``. A channel is *systematic* when it holds
outliers in at least ``min_recurrence`` tensors of the same width (the paper's "the channel
index is mostly the same across layers").

DGQ view (docs/algorithms.md §5.4), with a^max_i, a^min_i the max/min of index i of axis d:

    D_d = (max_i a^max − min_i a^max) + (max_i a^min − min_i a^min),   d* = argmax_d D_d
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qcompiler.calibration.statistics import TensorStats
from qcompiler.errors import QCompileError
from qcompiler.inspect.targets import Activation

#: How many channels/positions/tokens the summaries list by name (the JSON keeps every count).
TOP = 8


def samples_positions_channels(array: np.ndarray, channel_axis: int) -> np.ndarray:
    """The (batch, positions, channels) view that TensorStats uses; rank ≤ 1 is (batch, 1, 1)."""
    array = np.asarray(array)
    if array.ndim <= 1:
        return array.reshape(-1, 1, 1)
    moved = np.moveaxis(array, channel_axis, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1])


@dataclass
class OutlierCounts:
    """Pass 2 of one tensor: counts of |h| > threshold by channel/position/token, and Σh² per index.

    Work is done one sample at a time so the float64 temporaries stay at one sample's size.
    Non-finite values are left out, as TensorStats leaves them out.
    """

    tensor: str
    channel_axis: int
    threshold: float
    by_channel: np.ndarray
    by_position: np.ndarray
    energy_channel: np.ndarray = field(repr=False)
    energy_position: np.ndarray = field(repr=False)
    by_token: Counter = field(default_factory=Counter)
    absmax: float = 0.0
    values: int = 0

    @classmethod
    def start(cls, stats: TensorStats, threshold: float) -> OutlierCounts:
        channels = stats.channel_min.size
        positions = stats.index_min.size if stats.index_min is not None else 0
        return cls(stats.name, stats.channel_axis, threshold, np.zeros(channels, np.int64),
                   np.zeros(positions, np.int64), np.zeros(channels), np.zeros(positions))

    def update(self, array: np.ndarray, token_ids: np.ndarray | None = None) -> None:
        view = samples_positions_channels(array, self.channel_axis)
        if view.shape[2] != self.by_channel.size or (self.by_position.size and view.shape[1] != self.by_position.size):
            raise QCompileError(f"tensor '{self.tensor}' changed shape between the two calibration passes "
                                f"({view.shape[1:]} vs {(self.by_position.size, self.by_channel.size)})")
        ids = token_ids if token_ids is not None and token_ids.shape == view.shape[:2] else None
        for index, sample in enumerate(view):
            sample = sample.astype(np.float64)
            finite = np.isfinite(sample)
            if not finite.all():
                sample = np.where(finite, sample, 0.0)
            magnitude = np.abs(sample)
            self.absmax = max(self.absmax, float(magnitude.max(initial=0.0)))
            self.values += int(np.count_nonzero(finite))
            outlier = magnitude > self.threshold
            self.by_channel += outlier.sum(axis=0)
            per_position = outlier.sum(axis=1)
            if self.by_position.size:
                self.by_position += per_position
            squared = sample * sample
            self.energy_channel += squared.sum(axis=0)
            if self.energy_position.size:
                self.energy_position += squared.sum(axis=1)
            if ids is not None:
                hit = np.flatnonzero(per_position)
                for token, count in zip(ids[index, hit].tolist(), per_position[hit].tolist()):
                    self.by_token[token] += count

    @property
    def total(self) -> int:
        return int(self.by_channel.sum())


def _ranked(counts: np.ndarray | Counter) -> list[list[int]]:
    """[[index, count], ...] for every non-zero count, largest first (ties: lower index first)."""
    if isinstance(counts, Counter):
        return [[int(k), int(v)] for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    hits = np.flatnonzero(counts)
    order = hits[np.lexsort((hits, -counts[hits]))]
    return [[int(i), int(counts[i])] for i in order]


def dgq_view(stats: TensorStats) -> dict:
    """D_channel, D_pixel (positions) and the axis DGQ would group along; see the module docstring."""
    def spread(index_max: np.ndarray, index_min: np.ndarray) -> float | None:
        seen = np.isfinite(index_max) & np.isfinite(index_min)
        if not seen.any():
            return None
        high, low = index_max[seen], index_min[seen]
        return float((high.max() - high.min()) + (low.max() - low.min()))

    d_channel = spread(stats.channel_max, stats.channel_min)
    d_pixel = spread(stats.index_max, stats.index_min) if stats.index_max is not None else None
    axis = "pixel" if d_pixel is not None and d_channel is not None and d_pixel > d_channel else "channel"
    return {"D_channel": d_channel, "D_pixel": d_pixel, "axis": axis}


def summarize(target: Activation, stats: TensorStats, counts: OutlierCounts, tau: float) -> dict:
    """Every number inspect reports for one activation (JSON-ready)."""
    mean_abs = stats.mean_abs()
    channel_absmax = stats.channel_absmax
    median = float(np.median(channel_absmax)) if channel_absmax.size else 0.0
    top = np.argsort(-channel_absmax, kind="stable")[:TOP]
    return {
        "tensor": target.tensor, "label": target.label, "roles": list(target.roles),
        "consumers": list(target.consumers), "channel_axis": stats.channel_axis, "shape": list(stats.shape),
        "samples": stats.samples, "channels": int(channel_absmax.size), "positions": int(counts.by_position.size),
        "mean_abs": mean_abs, "absmax": stats.absmax, "min": stats.min, "max": stats.max,
        "max_mean_ratio": stats.absmax / mean_abs if mean_abs else None,
        "tau": tau, "threshold": counts.threshold,
        "outliers": {
            "total": counts.total, "fraction": counts.total / counts.values if counts.values else 0.0,
            "channels": _ranked(counts.by_channel), "positions": _ranked(counts.by_position),
            "token_ids": _ranked(counts.by_token),
        },
        "top_channels": [{"channel": int(c), "absmax": float(channel_absmax[c]),
                          "to_median": float(channel_absmax[c] / median) if median else None} for c in top],
        "dgq": dgq_view(stats),
        "channel_absmax": channel_absmax.tolist(),
        "pass_check": {"absmax_pass2": counts.absmax, "equal": counts.absmax == stats.absmax},
    }


def systematic_channels(summaries: list[dict], min_recurrence: int) -> list[dict]:
    """Channels holding outliers in ≥ ``min_recurrence`` tensors of one width, most recurrent first."""
    seen: dict[tuple[int, int], list[dict]] = {}
    for summary in summaries:
        for channel, count in summary["outliers"]["channels"]:
            seen.setdefault((summary["channels"], channel), []).append({"tensor": summary["tensor"],
                                                                         "label": summary["label"],
                                                                         "count": count})
    found = [{"width": width, "channel": channel, "tensors": len(hits),
              "outliers": sum(hit["count"] for hit in hits), "where": hits}
             for (width, channel), hits in seen.items() if len(hits) >= min_recurrence]
    return sorted(found, key=lambda item: (-item["tensors"], -item["outliers"], item["width"], item["channel"]))
