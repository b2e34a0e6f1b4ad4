"""Per-layer treatment from the statistics (none, equivalent scaling, groups, higher precision), and a recipe.

Error model: uniform rounding without clipping (min–max ranges widened to include 0, as in
quant.py); channels of X taken as uncorrelated. For a GEMM Y = X·W (W[o, j, k]: output, input
channel, kernel tap; K taps) whose input channel j carries E_j = Σ h² over n_j values, and
ω_j = Σ_{o,k} W_ojk² over all consumers of X, an equivalent scaling X' = X/σ, W' = σ·W gives

    signal  S   = Σ_j ω_j E_j
    act.    N_a = Σ_j ω_j n_j s_j² / 12                   s_j = σ_j·s': the step of X' mapped back to X
    weight  N_w = Σ_o Δ_o² / 12 · K · Σ_j E_j / σ_j²      Δ_o = max_{j,k}|σ_j W_ojk| / (2^(w−1) − 1)
    SQNR    = 10·log10( S / (N_a + N_w) )                 (dB, at the GEMM output)

(weights symmetric per output channel at ``wbits``, docs/algorithms.md §3). Steps per position p
instead of per channel give N_a = Σ_p n_p s_p² · mean_j(ω_j) / 12. The treatments:

    per tensor           σ = 1, s' = (max(h_max, 0) − min(h_min, 0)) / (2^b − 1)
    SmoothQuant, α = ½   σ_j = max(sqrt(max|X_j| / max_{o,k}|W_ojk|), 1e-5)
    OS+                  z_j = (max_j + min_j)/2 (exact: folded into the bias), σ_j = max(1, (max_j − z_j)/t),
                         t on a geometric grid below the largest half-range, best SQNR kept
    groups (DGQ)         σ = 1; K-means (K groups, seed 0) on (a^min_i, a^max_i) of one axis; s_i = s(group of i)

Target: a Gaussian tensor's per-tensor SQNR minus ``max_loss_bits`` · 6.02 dB. The min–max range of
~10^6 Gaussian samples is about ±5σ, so SQNR_gauss(b) = 10·log10(12·(2^b − 1)² / 10²) = 38.9 dB
at 8 bits. Decision for a GEMM input: per tensor ≥ target → none; else the better equivalent
scaling ≥ target → equivalent scaling; else the better group axis ≥ target → groups; else keep
higher precision, with the bits that close the gap at 6.02 dB per bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompiler.calibration.statistics import TensorStats
from qcompiler.inspect.activations import OutlierCounts

DB_PER_BIT = 20 * math.log10(2)  # 6.02 dB


@dataclass(frozen=True)
class Consumers:
    """The consumers of one GEMM input: ω_j, max|W| per input channel, and per layer max_k|W_ojk| with K.

    ``column_absmax`` is None (and ``layers`` empty) when the weights cannot be lined up with the
    input channels (a grouped Conv): then only activation noise is modelled and scaling is not.
    """

    omega: np.ndarray
    column_absmax: np.ndarray | None
    layers: tuple[tuple[np.ndarray, int], ...] = ()


def gaussian_sqnr_db(bits: int) -> float:
    return 10 * math.log10(12 * (2**bits - 1) ** 2 / 10**2)


def _step(low, high, bits: int):
    return (np.maximum(high, 0.0) - np.minimum(low, 0.0)) / (2**bits - 1)


class _Model:
    """SQNR at the GEMM output for given activation steps and scaling σ (module docstring)."""

    def __init__(self, counts: OutlierCounts, consumers: Consumers, wbits: int):
        self.omega, self.layers = consumers.omega, consumers.layers
        self.energy = counts.energy_channel
        self.per_channel = counts.values / max(counts.by_channel.size, 1)
        self.per_position = counts.values / max(counts.by_position.size, 1)
        self.signal = float(np.dot(self.omega, self.energy))
        self.weight_qmax = 2 ** (wbits - 1) - 1

    def _weight_noise(self, sigma: np.ndarray) -> float:
        seen = np.divide(self.energy, np.square(sigma), out=np.zeros_like(self.energy), where=sigma > 0).sum()
        total = 0.0
        for row_max, taps in self.layers:
            delta = (row_max * sigma).max(axis=1) / self.weight_qmax
            total += float(np.square(delta).sum()) / 12 * taps * seen
        return total

    def _db(self, noise: float) -> float | None:
        if self.signal <= 0:
            return None
        return math.inf if noise <= 0 else 10 * math.log10(self.signal / noise)

    def channels(self, steps: np.ndarray, sigma: np.ndarray | None = None) -> float | None:
        sigma = np.ones_like(self.energy) if sigma is None else sigma
        activation = float(np.dot(self.omega, self.per_channel * np.square(steps))) / 12
        return self._db(activation + self._weight_noise(sigma))

    def positions(self, steps: np.ndarray) -> float | None:
        activation = float(np.sum(self.per_position * np.square(steps)) * self.omega.mean()) / 12
        return self._db(activation + self._weight_noise(np.ones_like(self.energy)))


def _seen(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices that saw no finite value keep ±inf in TensorStats; they hold no signal, so use 0."""
    seen = np.isfinite(low) & np.isfinite(high)
    return np.where(seen, low, 0.0), np.where(seen, high, 0.0)


def _smoothquant(model: _Model, low, high, column_absmax, bits: int) -> float | None:
    if column_absmax is None or column_absmax.size != low.size:
        return None
    absmax = np.maximum(np.abs(low), np.abs(high))
    # A dead weight column (max|W| = 0) sends no error to the output: leave that channel unscaled.
    ratio = np.divide(absmax, column_absmax, out=np.ones_like(absmax), where=column_absmax > 0)
    sigma = np.maximum(np.sqrt(ratio), 1e-5)
    step = _step((low / sigma).min(), (high / sigma).max(), bits)
    return model.channels(sigma * step, sigma)


def _osplus(model: _Model, low, high, bits: int, grid: int = 32) -> tuple[float | None, float | None]:
    if not model.layers:
        return None, None
    half = (high - low) / 2
    top = float(half.max())
    if top <= 0:
        return model.channels(np.zeros_like(half)), None
    best, best_t = None, None
    for t in np.geomspace(top, top * 1e-3, grid):
        sigma = np.maximum(1.0, half / t)
        step = 2 * float((half / sigma).max()) / (2**bits - 1)
        sqnr = model.channels(sigma * step, sigma)
        if sqnr is not None and (best is None or sqnr > best):
            best, best_t = sqnr, float(t)
    return best, best_t


def _group_steps(low: np.ndarray, high: np.ndarray, groups: int, bits: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    points = np.stack([low, high], axis=1)
    distinct = len(np.unique(points, axis=0))
    if distinct <= groups:  # every distinct (min, max) gets its own group: exact ranges
        return _step(low, high, bits)
    # A few hundred 2-D points: OpenMP threads only spin (20x slower on a busy 2-core machine).
    with threadpool_limits(limits=1):
        labels = KMeans(n_clusters=groups, n_init=4, random_state=0).fit_predict(points)
    group_low = np.array([low[labels == g].min() for g in range(groups)])
    group_high = np.array([high[labels == g].max() for g in range(groups)])
    return _step(group_low, group_high, bits)[labels]


def predict(stats: TensorStats, counts: OutlierCounts, consumers: Consumers, abits: int, wbits: int,
            groups: int) -> dict:
    """Predicted GEMM-output SQNR (dB) of every treatment, by the formulas of the module docstring."""
    model = _Model(counts, consumers, wbits)
    low, high = _seen(stats.channel_min, stats.channel_max)
    osplus, osplus_t = _osplus(model, low, high, abits)
    result = {"per_tensor": model.channels(np.full(low.size, _step(stats.min, stats.max, abits))),
              "smoothquant": _smoothquant(model, low, high, consumers.column_absmax, abits),
              "osplus": osplus, "osplus_t": osplus_t,
              "groups_channel": model.channels(_group_steps(low, high, groups, abits)), "groups_pixel": None}
    if stats.index_min is not None and counts.by_position.size:
        index_low, index_high = _seen(stats.index_min, stats.index_max)
        result["groups_pixel"] = model.positions(_group_steps(index_low, index_high, groups, abits))
    return result


def _best(options: dict[str, float | None]) -> tuple[str | None, float | None]:
    known = {name: value for name, value in options.items() if value is not None}
    if not known:
        return None, None
    name = max(known, key=known.get)
    return name, known[name]


def recommend(summary: dict, sqnr: dict, bits: int, max_loss_bits: float) -> dict:
    """The treatment of one GEMM input and the numbers behind it (rules in the module docstring)."""
    target = gaussian_sqnr_db(bits) - max_loss_bits * DB_PER_BIT
    scaling, scaling_db = _best({"smoothquant": sqnr["smoothquant"], "osplus": sqnr["osplus"]})
    axis, groups_db = _best({"channel": sqnr["groups_channel"], "pixel": sqnr["groups_pixel"]})
    per_tensor = sqnr["per_tensor"]
    row = {"tensor": summary["tensor"], "label": summary["label"], "consumers": summary["consumers"],
           "target_db": target, "sqnr_db": sqnr, "max_mean_ratio": summary["max_mean_ratio"],
           "outliers": summary["outliers"]["total"], "dgq_axis": summary["dgq"]["axis"], "bits": bits}
    if per_tensor is None or per_tensor >= target:
        return {**row, "treatment": "none", "variant": None, "reason": f"per-tensor {_text(per_tensor)} ≥ target "
                f"{target:.1f} dB"}
    if scaling_db is not None and scaling_db >= target:
        return {**row, "treatment": "equivalent_scaling", "variant": scaling,
                "reason": f"per-tensor {_text(per_tensor)} < {target:.1f} dB; {scaling} {_text(scaling_db)}"}
    if groups_db is not None and groups_db >= target:
        note = "" if axis == summary["dgq"]["axis"] else f" (D_d picks {summary['dgq']['axis']})"
        return {**row, "treatment": "groups", "variant": axis,
                "reason": f"per-tensor {_text(per_tensor)}, scaling {_text(scaling_db)} < {target:.1f} dB; "
                          f"{axis} groups {_text(groups_db)}{note}"}
    best = max(v for v in (per_tensor, scaling_db, groups_db) if v is not None)
    extra = math.ceil((target - best) / DB_PER_BIT)
    return {**row, "treatment": "higher_precision", "variant": f"≥{bits + extra} bits",
            "reason": f"best prediction {_text(best)} < {target:.1f} dB: {extra} more bit(s) needed"}


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} dB"


def suggest_recipe(rows: list[dict], attention: list[dict], diffusion: bool) -> dict:
    """Map the per-layer treatments to one of the project's recipes (minmax, smoothquant, osplus, dgq, dmq)."""
    treatments = {row["treatment"] for row in rows}
    scaling = [row["variant"] for row in rows if row["treatment"] == "equivalent_scaling"]
    keep = [row["label"] for row in rows if row["treatment"] == "higher_precision"]
    if "groups" in treatments:
        name, why = "dgq", "some inputs need token/pixel or channel groups (distribution-aware group quantization)"
    elif scaling and diffusion:
        name, why = "dmq", "equivalent scaling is needed and the calibration data is timestep-tagged (diffusion)"
    elif scaling:
        name = "osplus" if scaling.count("osplus") > scaling.count("smoothquant") else "smoothquant"
        why = f"{len(scaling)} input(s) need equivalent scaling; {name} predicts the higher SQNR on most"
    else:
        name, why = "minmax", "every GEMM input reaches the target per tensor"
    counts = {t: sum(row["treatment"] == t for row in rows)
              for t in ("none", "equivalent_scaling", "groups", "higher_precision")}
    return {"suggested": name, "reason": why, "treatments": counts, "keep_higher_precision": keep,
            "attention_note": _attention_note(attention)}


def _attention_note(attention: list[dict]) -> str | None:
    """Sinks (keys that are outliers in at least half of the samples) call for DGQ's log2 attention quantizer."""
    sinks = [site for site in attention if site["sink_positions"]]
    if not sinks:
        return None
    start = sum(0 in site["sink_positions"] for site in sinks)
    note = (f"{len(sinks)} attention block(s) have sink keys, {start} of them at key 0; if attention "
            "probabilities are quantized, use a log2 quantizer (dgq-log2)")
    return note + (", with key 0 (the start token) kept exact" if start else "")
