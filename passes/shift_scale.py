"""Pass ``shift_scale`` (Outlier Suppression+): centre each channel, scale the wide ones down to a searched t*.

Rewrite, per scale group (an activation X and the Linears reading it; Q, K, V share one):
    z_j = (max_t X_tj + min_t X_tj)/2          s_j = max(1, (max_t X_tj − z_j)/t*)
    X' = (X − z)/s,   W'[j, :] = s_j·W[j, :],   b' = b + z·W          (folded by ``qcompiler.folding.fold``)
so channel j of X' spans ±min(r_j, t*) with r_j = (max_j − min_j)/2. t* comes from a 1-D grid
search minimising the quantized consumers' output error on calibration samples:
    error(t) = Σ_consumers ‖(X − z)·W − Q_a((X − z)/s)·Q_w(s·W)‖²      (b and z·W cancel)
with Q_a uint8 asymmetric per tensor over X''s calibrated range and Q_w int8 symmetric per output
channel (int4 blocks for W4 MatMuls), as the recipe lowers them. docs/algorithms.md §5.1 scores Q/K/V by
the attention output; this pass scores each consumer's own output (no attention simulation yet).

Grid: ``grid`` candidates spaced geometrically (outlier ratios span orders of magnitude) from
r_max = max_j r_j (s = 1: a pure shift) down to 1, as in the paper; when r_max ≤ 1 the floor is
r_max·``min_fraction`` instead, so the search can still flatten channels of small tensors.
Where a group has ≥ 4·128 sample rows, every point is first scored on every 4th row and only the 3
best are scored on all of them (``screen``, ``finalists``; ``scale_search.screened_argmin``).

Two choices beyond the paper, both scored by the same error:
- ``try_unshifted``: the search also runs with z = 0 (then r_j = max|X_j|) and keeps the better.
  After GELU most values sit at 0, which the uint8 grid holds exactly; centring moves them all
  to −z_j/s_j, off the grid, and the rounding becomes a bias shared by every token.
- ``explicit_shift`` (off): where no producer absorbs z, shifting needs a Sub at run time, and the
  float32 GEMM then carries |X − z|-sized terms that b + z·W cancels. On MiniLM (12 such groups
  on post-LN residual branches) that cancellation uses up the whole 1e-5 equivalence budget
  (1.0e-5 vs 3e-6 scale-only, on two calibration batches), so by default such groups are scaled
  only (one Mul); the shift is kept wherever a producer (e.g. the V projection) absorbs it.

Exact: the rewrite only re-associates X·W + b = ((X − z)/s)·(s·W) + (b + z·W); see qcompiler.folding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.folding import ScaleGroup, find_absorber, find_scale_groups, fold
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.scale_search import OutputError, screened_argmin, statistics_and_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftScaleConfig:
    grid: int = 20
    #: Also search with z = 0 (scale only) and keep whichever gives the lower output error.
    try_unshifted: bool = True
    #: Allow a shift where no producer absorbs it (an explicit Sub at run time).
    explicit_shift: bool = False
    #: Floor of the t grid relative to r_max when r_max ≤ 1 (else the floor is 1).
    min_fraction: float = 1 / 16
    #: Calibration batches read for the search, and the most rows (tokens) of X kept per group.
    batches: int = 4
    rows: int = 1024
    #: Output channels of each consumer scored by the search (a seeded uniform draw where N is larger).
    columns: int = 512
    #: Screening: every grid point is scored on every ``screen``-th row, and the ``finalists`` best on
    #: all rows (``scale_search.screened_argmin``); screen = 1 scores every point on all rows.
    screen: int = 4
    finalists: int = 3
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.grid < 2 or self.batches < 1 or self.rows < 1 or self.columns < 1 or not 0 < self.min_fraction < 1 \
                or self.screen < 1 or self.finalists < 1:
            raise ValueError(f"ShiftScaleConfig: grid ≥ 2, batches ≥ 1, rows ≥ 1, columns ≥ 1, screen ≥ 1, "
                             f"finalists ≥ 1 and 0 < min_fraction < 1 are required, got {self}")


def search_threshold(stats, probe: OutputError, shift: np.ndarray, config: ShiftScaleConfig
                     ) -> tuple[np.ndarray, float, float]:
    """(s, t*, error) for one shift: s_j = max(1, r_j/t) with r_j = max(max_j − z_j, z_j − min_j).

    For z = (max + min)/2, r_j is the half range (max_j − min_j)/2 of the paper; for z = 0 it is max|X_j|.
    """
    half_range = np.maximum(stats.channel_max - shift, shift - stats.channel_min)
    top = float(half_range.max())
    if top <= 0:  # every channel constant: the shift alone makes X' zero
        return np.ones_like(shift), 0.0, probe(np.ones_like(shift))
    floor = 1.0 if top > 1.0 else top * config.min_fraction
    candidates = np.geomspace(top, floor, config.grid) if top > floor else np.array([top])
    scales = [np.maximum(1.0, half_range / t) for t in candidates]
    best, error = screened_argmin(probe, scales, config.screen, config.finalists)
    return scales[best], float(candidates[best]), error


def os_plus_parameters(samples: np.ndarray, group: ScaleGroup, stats, settings: QuantSettings,
                       config: ShiftScaleConfig, allow_shift: bool = True
                       ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(s, z, t*) for one group: the paper's centring shift, or no shift (z = None) where that is better."""
    centre = (stats.channel_max + stats.channel_min) / 2
    options = []
    if allow_shift:
        probe = OutputError(samples, group, stats, centre, settings, config.columns, config.seed)
        options.append((*search_threshold(stats, probe, centre, config), centre))
    if config.try_unshifted or not allow_shift:
        probe = OutputError(samples, group, stats, None, settings, config.columns, config.seed)
        options.append((*search_threshold(stats, probe, np.zeros_like(centre), config), None))
    scale, threshold, _, shift = min(options, key=lambda option: option[2])
    return scale, shift, threshold


class ShiftScale(Pass):
    """X' = (X − z)/s with z = (max + min)/2, s = max(1, (max − z)/t*), t* searched; W' = s·W, b' = b + z·W.

    Outlier Suppression+ (see the module docstring for the search). Exact before quantization:
    the folds re-associate X·W + b and the producer (or an explicit Sub/Mul) writes (X − z)/s.
    """

    name = "shift_scale"
    Config = ShiftScaleConfig
    exact = True

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "for activation ranges")

    def call(self, ctx: CompileContext) -> PassResult:
        groups = find_scale_groups(ctx.graph)
        if not groups:
            return PassResult(False, ("no Linear reads an activation",))
        started = time.perf_counter()
        stats, samples = statistics_and_samples(ctx, groups, self.config.batches, self.config.rows,
                                                self.config.seed, self.config.progress)
        calibrated = time.perf_counter()
        kinds: dict[str, int] = {}
        thresholds, unshifted = [], 0
        # Downstream groups first: an upstream search then sees weights already divided by
        # downstream scales (the weights that will be quantized). X itself never changes.
        for group in tqdm(list(reversed(groups)), desc=self.name, unit="group", leave=False,
                          disable=None if self.config.progress else True):
            allow_shift = self.config.explicit_shift or bool(find_absorber(ctx.graph, group))
            scale, shift, threshold = os_plus_parameters(samples[group.name], group, stats[group.name],
                                                         ctx.settings, self.config, allow_shift)
            kind = fold(ctx, group, scale, shift, self.name).split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            thresholds.append(threshold)
            unshifted += shift is None
        ctx.graph.cleanup().toposort()
        log.info("%d groups: ranges and rows %.1f s, threshold searches and folds %.1f s", len(groups),
                 calibrated - started, time.perf_counter() - calibrated)
        summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        return PassResult(True, (f"{len(groups)} groups scaled, {len(groups) - unshifted} of them shifted; "
                                 f"absorbed by: {summary}",
                                 f"t* from {min(thresholds):.3g} to {max(thresholds):.3g}"))
