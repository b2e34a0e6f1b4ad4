"""Weight outliers: max|W| / mean|W| per output row and input column, and where they meet activation outliers.

With the weight viewed as W[o, i, k] (output channel, input channel, kernel tap):

    row ratio       r_o = max_{i,k} |W_oik| / mean_{i,k} |W_oik|
    column ratio    c_i = max_{o,k} |W_oik| / mean_{o,k} |W_oik|
    weight outlier  (o, i, k)  ⇔  |W_oik| > τ · mean_{i,k} |W_o··|     (seed 000: O_weight, μ per row)

Flags: weight-outlier input channels that are activation-outlier channels of the layer's
input (the paper finds 100% agreement in the feature dimension between W_down and x_down),
and weight-outlier output channels that are systematic channels of the output width (W_down
rows and the layer output h_ℓ). A grouped Conv numbers its input channels within a group, so
input flags are not set for it.
"""

from __future__ import annotations

import numpy as np

from qcompiler.inspect.activations import TOP
from qcompiler.inspect.targets import Layer


def _ratio(magnitude: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    mean = magnitude.mean(axis=axes, dtype=np.float64)
    return np.divide(magnitude.max(axis=axes), mean, out=np.zeros_like(mean), where=mean > 0)


def _by_channel(counts: np.ndarray) -> list[list[int]]:
    hits = np.flatnonzero(counts)
    order = hits[np.lexsort((hits, -counts[hits]))]
    return [[int(i), int(counts[i])] for i in order]


def analyse(layer: Layer, tau: float, input_outlier_channels: set[int],
            systematic: dict[int, set[int]]) -> dict:
    """Every number inspect reports for one weight (JSON-ready); see the module docstring."""
    # float32 |W| with float64 means: one weight-sized temporary, not two.
    magnitude = np.abs(np.asarray(layer.weight, dtype=np.float32))
    rows, columns = _ratio(magnitude, (1, 2)), _ratio(magnitude, (0, 2))
    row_mean = magnitude.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    outlier = magnitude > tau * row_mean
    by_input, by_output = outlier.sum(axis=(0, 2)), outlier.sum(axis=(1, 2))
    weight_inputs = {int(i) for i in np.flatnonzero(by_input)}
    weight_outputs = {int(o) for o in np.flatnonzero(by_output)}
    comparable = layer.groups == 1
    shared = sorted(weight_inputs & input_outlier_channels) if comparable else []
    out_systematic = systematic.get(layer.weight.shape[0], set())
    column_rank = np.argsort(np.argsort(-columns, kind="stable"), kind="stable")
    return {
        "node": layer.node, "label": layer.label, "op": layer.op, "weight": layer.weight_name,
        "input": layer.input, "shape_out_in_taps": list(layer.weight.shape), "groups": layer.groups,
        "row_ratio": {"max": float(rows.max()), "channel": int(rows.argmax())},
        "column_ratio": {"max": float(columns.max()), "channel": int(columns.argmax())},
        "top_columns": [{"channel": int(i), "ratio": float(columns[i]),
                         "activation_outlier": comparable and int(i) in input_outlier_channels}
                        for i in np.argsort(-columns, kind="stable")[:TOP]],
        "outliers": {"tau": tau, "total": int(outlier.sum()),
                     "input_channels": _by_channel(by_input), "output_channels": _by_channel(by_output)},
        "flagged_input_channels": [{"channel": i, "column_ratio": float(columns[i]),
                                    "column_rank": int(column_rank[i]) + 1} for i in shared],
        "flagged_output_channels": sorted(weight_outputs & out_systematic),
        "input_agreement": {"weight_outlier_channels": len(weight_inputs),
                            "activation_outlier_channels": len(input_outlier_channels) if comparable else None,
                            "shared": len(shared)},
        "row_ratios": rows.tolist(), "column_ratios": columns.tolist(),
    }
