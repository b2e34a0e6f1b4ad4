"""Attention outliers: keys that collect a large share of all attention, and the mass on the start token.

For one sample with Softmax output A[h, i, j] (H heads, L_q queries, L_k keys):

    Â_j = Σ_i (1/H) Σ_h A[h, i, j]     head-averaged attention summed over queries (Σ_j Â_j = L_q)
    key j is an attention outlier  ⇔  Â_j ≥ 0.1 · L_q          (docs/algorithms.md §5.7)
    start-token mass = Â_0 / L_q       the share of all attention that lands on key 0

Uniform attention gives Â_j = L_q / L_k, so an outlier key draws at least 0.1·L_k times its fair
share. In cross-attention key 0 is the start token of the context (DGQ keeps that column exact).
Every query row counts, padding rows included: the graph does not say which rows are padding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.inspect.targets import AttentionSite


@dataclass
class AttentionMass:
    """Running sums of Â over samples, per key position, and outlier-key counts."""

    tensor: str
    kind: str
    fraction: float = 0.1
    samples: int = 0
    queries: int = 0
    mass: np.ndarray = field(default_factory=lambda: np.zeros(0))
    outlier_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    start_share_sum: float = 0.0
    start_share_max: float = 0.0
    by_token: Counter = field(default_factory=Counter)

    def _grow(self, keys: int) -> None:
        """Sequences of different lengths: key positions beyond the longest so far start at zero."""
        if keys > self.mass.size:
            self.mass = np.pad(self.mass, (0, keys - self.mass.size))
            self.outlier_keys = np.pad(self.outlier_keys, (0, keys - self.outlier_keys.size))

    def update(self, probabilities: np.ndarray, token_ids: np.ndarray | None = None) -> None:
        """Fold one batch of Softmax outputs, (B, H, L_q, L_k) or single-head (B, L_q, L_k)."""
        probabilities = np.asarray(probabilities)
        if probabilities.ndim not in (3, 4):
            raise QCompileError(f"attention probabilities '{self.tensor}' have rank {probabilities.ndim}; "
                                "expected (batch, heads, queries, keys) or (batch, queries, keys)")
        queries, keys = probabilities.shape[-2:]
        self._grow(keys)
        self.queries = max(self.queries, queries)
        ids = token_ids if (self.kind == "self" and token_ids is not None
                            and token_ids.shape == (probabilities.shape[0], keys)) else None
        for index, sample in enumerate(probabilities):
            per_query = sample.mean(axis=0, dtype=np.float64) if sample.ndim == 3 else sample.astype(np.float64)
            mass = per_query.sum(axis=0)  # Â_j, one value per key
            outlier = mass >= self.fraction * queries
            self.mass[:keys] += mass
            self.outlier_keys[:keys] += outlier
            share = float(mass[0] / queries)
            self.start_share_sum += share
            self.start_share_max = max(self.start_share_max, share)
            if ids is not None:
                self.by_token.update(ids[index, np.flatnonzero(outlier)].tolist())
            self.samples += 1


def summarize(site: AttentionSite, mass: AttentionMass) -> dict:
    """Every number inspect reports for one attention block (JSON-ready)."""
    samples = max(mass.samples, 1)
    hits = np.flatnonzero(mass.outlier_keys)
    ranked = hits[np.lexsort((hits, -mass.outlier_keys[hits]))]
    return {
        "tensor": site.tensor, "label": site.label, "kind": site.kind, "samples": mass.samples,
        "queries": mass.queries, "keys": int(mass.mass.size),
        "fraction": mass.fraction, "threshold": mass.fraction * mass.queries,
        "start_token_mass": {"mean": mass.start_share_sum / samples, "max": mass.start_share_max},
        "outlier_keys": [[int(k), int(mass.outlier_keys[k])] for k in ranked],
        "outlier_keys_per_sample": float(mass.outlier_keys.sum() / samples),
        # A key that is an outlier in at least half of the samples is a fixed sink (the paper's
        # "initial token"), rather than a content-dependent one.
        "sink_positions": [int(k) for k in ranked if mass.outlier_keys[k] * 2 >= mass.samples],
        "token_ids": [[int(k), int(v)] for k, v in sorted(mass.by_token.items(), key=lambda kv: (-kv[1], kv[0]))],
        "mean_mass": (mass.mass / samples).tolist(),
    }
