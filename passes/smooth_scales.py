"""Pass ``smooth_scales`` (SmoothQuant): migrate activation outliers into the weights by per-channel scales.

Rewrite, per scale group (an activation X and the Linears reading it; Q, K, V share one s):
    s_j = max|X_j|^α / max_i |W_ji|^(1−α)       (max over every consumer's row j; s_j ≥ 1e-5)
    X' = X/s,   W'[j, :] = s_j·W[j, :]                                    (folded by ``qcompiler.folding.fold``)
max|X_j| is the calibration abs-max of channel j (the last axis of a MatMul input). With α = 0.5
both sides end at max|X'_j| = max|W'_j| = sqrt(max|X_j|·max|W_j|): the per-tensor activation
grid no longer has to span one outlier channel. Like the paper's code, max|W_j| is clamped to
≥ 1e-5; a channel that never fired (max|X_j| = 0) keeps s_j = 1, since any other value only
rescales a row of zeros and a dead-channel s of 1e-5 would blow up unseen inputs.

Optional (``search_alpha``): per group, α from ``alpha_grid`` minimising the quantized
consumers' output error on calibration samples (``shift_scale.OutputError``), instead of one α.

Exact: X·W = (X/s)·(s·W), and the producer (or an explicit Mul) writes X/s; see qcompiler.folding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qcompiler.context import CompileContext
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.folding import ScaleGroup, find_scale_groups, fold
from qcompiler.scale_search import OutputError, matmul_weights, statistics_and_samples

#: Lower clamp of s and of max|W_j| (the SmoothQuant reference implementation's 1e-5).
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothScalesConfig:
    alpha: float = 0.5
    search_alpha: bool = False
    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    #: For the α search: calibration batches read, and the most rows (tokens) of X kept per group.
    batches: int = 4
    rows: int = 1024
    #: Output channels of each consumer scored by the α search (see ``shift_scale.OutputError``).
    columns: int = 512
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0 or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"SmoothScalesConfig: α must lie in [0, 1], got {self.alpha} and {self.alpha_grid}")
        if self.search_alpha and not self.alpha_grid:
            raise ValueError("SmoothScalesConfig: search_alpha needs a non-empty alpha_grid")


def weight_row_absmax(group: ScaleGroup) -> np.ndarray:
    """max_i |W_ji| per input channel j over every consumer's weight (current values)."""
    rows = [np.abs(matmul_weights(unit)).max(axis=1) for unit in group.consumers]
    return np.max(rows, axis=0)


def smooth_scale(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|X|^α / max(max|W|, 1e-5)^(1−α), clamped to ≥ 1e-5; dead channels (max|X| = 0) get 1."""
    activation = activation_absmax.astype(np.float64)
    weight = np.maximum(weight_absmax.astype(np.float64), MIN_SCALE)
    scale = np.maximum(activation**alpha / weight ** (1.0 - alpha), MIN_SCALE)
    return np.where(activation > 0, scale, 1.0)


class SmoothScales(Pass):
    """X' = X/s, W' = s·W with s_j = max|X_j|^α / max_i|W_ji|^(1−α) per scale group (SmoothQuant).

    Exact before quantization: X·W = (X/s)·(s·W); the producer (LayerNorm affine, a Linear's
    output channels, the V projection through attention) or an explicit Mul writes X/s.
    """

    name = "smooth_scales"
    Config = SmoothScalesConfig
    exact = True

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "for activation ranges")

    def call(self, ctx: CompileContext) -> PassResult:
        groups = find_scale_groups(ctx.graph)
        if not groups:
            return PassResult(False, ("no Linear reads an activation",))
        if self.config.search_alpha:
            stats, samples = statistics_and_samples(ctx, groups, self.config.batches, self.config.rows,
                                                    self.config.seed, self.config.progress)
        else:
            stats, samples = ctx.statistics({g.name: g.channel_axis for g in groups},
                                            progress=self.config.progress, per_index=False), {}
        kinds: dict[str, int] = {}
        alphas = []
        # Downstream groups first, so max|W_j| is read from weights whose output channels already
        # carry downstream scales: the weights that will be quantized. X itself never changes.
        for group in tqdm(list(reversed(groups)), desc=self.name, unit="group", leave=False,
                          disable=None if self.config.progress else True):
            tensor_stats = stats[group.name]
            alpha = self._alpha(ctx, group, tensor_stats, samples)
            scale = smooth_scale(tensor_stats.channel_absmax, weight_row_absmax(group), alpha)
            kind = fold(ctx, group, scale, None, self.name).split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            alphas.append(alpha)
        ctx.graph.cleanup().toposort()
        summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        notes = [f"{len(groups)} groups smoothed; absorbed by: {summary}"]
        if self.config.search_alpha:
            notes.append(f"searched α from {min(alphas):g} to {max(alphas):g} (mean {np.mean(alphas):.2f})")
        return PassResult(True, tuple(notes))

    def _alpha(self, ctx: CompileContext, group: ScaleGroup, stats, samples: dict) -> float:
        if not self.config.search_alpha:
            return self.config.alpha
        probe = OutputError(samples[group.name], group, stats, None, ctx.settings, self.config.columns,
                            self.config.seed)
        weight = weight_row_absmax(group)
        errors = [probe(smooth_scale(stats.channel_absmax, weight, a)) for a in self.config.alpha_grid]
        return float(self.config.alpha_grid[int(np.argmin(errors))])
