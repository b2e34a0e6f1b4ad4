"""Pass ``qdit_groups`` (Q-DiT): group-wise weights and activations along K, group size per layer searched.

Per Linear (X·W, W [K, N]), a group size g from Q-DiT's set {32, 64, 128, 192, 288} scaled to the model:
    g_l = the divisor of K nearest to g_paper · (hidden / 1152)
with ``hidden`` the model's most common Linear input width and 1152 DiT-XL's (zoo DiT: 96, so the set is
{3, 6, 12, 16, 24} for every layer, fc2's K = 384 included). Weights: symmetric int``wbits`` per group and
output column; activations: asymmetric int``abits`` per token and group, ranges computed at run time
(``dynamic``; ``dynamic = false``: one calibrated range per group). The pass only decides: one
``DynamicGroupPlan`` per Linear on ``ctx.dynamic_group_plans`` (``quantize_weights`` leaves those
weights float); the target lowers them (ORT: ``qcompiler.lowering.dynamic_groups``, one MatMulInteger
per Linear with the run-time per-token-group scales on its int32 partial sums).

Search (Q-DiT's evolutionary search; its fitness is FID on 800 samples, too costly here): a
configuration c assigns each layer one of the five sizes; it is valid when the mean paper-scale
size is ≥ ``budget`` (128: as coarse as uniform 128 on average). Fitness, a cheap proxy:
    proxy(c) = Σ_l e_l(g_{c,l}),   e_l(g) = ‖X_l·W_l − Q_g(X_l)·Q_g(W_l)‖² / ‖X_l·W_l‖²
on ``rows`` sampled rows of each layer's calibration input (relative output error; layers add up,
interactions through the network are ignored: benchmarks/bench_dit_recipes.py measures how well it
ranks configurations against the Fréchet distance of final images). Population ``population`` (50),
the best ``keep`` (10) survive, ``mutations`` (25) children resample each layer with probability
``mutation_prob`` (0.1), ``crossovers`` (15) children mix two survivors per layer, ``generations`` (10).
``sizes`` (paper-scale, one per layer in graph order) or ``uniform`` (one size for all) skips the search.

Error bound per element (inside the range): |X − X̂| ≤ s/2 with s = (hi − lo)/(2^abits − 1) of its
token's group; |W − Ŵ| ≤ s_w/2 of its group and column.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from qcompiler.context import CompileContext
from qcompiler.errors import QCompileError
from qcompiler.folding import find_scale_groups
from qcompiler.grids import DynamicGroupPlan
from qcompiler.lowering.dynamic_groups import reference
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.scale_search import matmul_weights, sample_inputs

log = logging.getLogger(__name__)

PAPER_SIZES = (32, 64, 128, 192, 288)
PAPER_WIDTH = 1152


@dataclass(frozen=True)
class QditGroupsConfig:
    budget: float = 128.0
    dynamic: bool = True
    #: Paper-scale size per layer in graph order (skips the search), or () to search.
    sizes: tuple[int, ...] = ()
    #: One paper-scale size for every layer (skips the search; Q-DiT's uniform baseline), or 0.
    uniform: int = 0
    population: int = 50
    keep: int = 10
    mutations: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 15
    generations: int = 10
    batches: int = 4
    rows: int = 512
    seed: int = 0

    def __post_init__(self):
        if not PAPER_SIZES[0] <= self.budget <= PAPER_SIZES[-1] or any(s not in PAPER_SIZES for s in self.sizes) \
                or (self.uniform and self.uniform not in PAPER_SIZES):
            raise ValueError(f"QditGroupsConfig: budget in [32, 288] and sizes from {PAPER_SIZES}, got {self}")
        if min(self.population, self.keep, self.generations, self.batches, self.rows) < 1 or self.keep > self.population:
            raise ValueError(f"QditGroupsConfig: population ≥ keep ≥ 1 and generations, batches, rows ≥ 1, got {self}")


def _counts(values) -> dict[int, int]:
    sizes, counts = np.unique(values, return_counts=True)
    return {int(size): int(count) for size, count in zip(sizes, counts)}


def scaled_sizes(k: int, hidden: int) -> list[int]:
    """Per paper size, the divisor of k nearest to g_paper·hidden/1152 (ties: the larger)."""
    divisors = np.array([d for d in range(1, k + 1) if k % d == 0])
    return [int(divisors[np.argmin(np.abs(divisors - g * hidden / PAPER_WIDTH) - 1e-9 * divisors)])
            for g in PAPER_SIZES]


def layer_errors(samples: np.ndarray, weight: np.ndarray, sizes: list[int], abits: int, wbits: int) -> np.ndarray:
    """e_l(g) for each candidate size: relative output error of group-wise Q(X)·Q(W) on sampled rows."""
    exact = samples.astype(np.float64) @ weight.astype(np.float64)
    energy = max(float(np.sum(exact**2)), 1e-30)
    return np.array([np.sum((exact - reference(samples, weight, g, abits, wbits)) ** 2) / energy for g in sizes])


def evolve(errors: np.ndarray, budget: float, config: QditGroupsConfig) -> tuple[np.ndarray, list[np.ndarray]]:
    """Q-DiT's evolutionary search over choice indices (layers,) minimising Σ_l errors[l, c_l].

    Returns the best configuration and the final population (best first)."""
    rng = np.random.default_rng(config.seed)
    layers, choices = errors.shape
    sizes = np.array(PAPER_SIZES, dtype=np.float64)
    valid = lambda c: sizes[c].mean() >= budget - 1e-9  # noqa: E731
    fitness = lambda c: float(errors[np.arange(layers), c].sum())  # noqa: E731

    def draw(make, count):
        out, tries = [], 0
        while len(out) < count and tries < 100 * count:
            candidate, tries = make(), tries + 1
            if valid(candidate):
                out.append(candidate)
        return out

    uniform = [np.full(layers, c) for c in range(choices) if valid(np.full(layers, c))]
    population = uniform + draw(lambda: rng.integers(0, choices, layers), config.population - len(uniform))
    for _ in range(config.generations):
        population = sorted(population, key=fitness)[: config.keep]
        parents = population

        def mutate():
            child = parents[rng.integers(len(parents))].copy()
            flip = rng.random(layers) < config.mutation_prob
            child[flip] = rng.integers(0, choices, int(flip.sum()))
            return child

        def cross():
            a, b = parents[rng.integers(len(parents))], parents[rng.integers(len(parents))]
            return np.where(rng.random(layers) < 0.5, a, b)

        population = parents + draw(mutate, config.mutations) + draw(cross, config.crossovers)
    population = sorted(population, key=fitness)
    return population[0], population


def error_table(ctx: CompileContext, groups, units, candidates, config: QditGroupsConfig) -> np.ndarray:
    """e_l(g) (layers, 5) on ``config.rows`` rows of the first ``config.batches`` calibration batches."""
    samples = sample_inputs(ctx, groups, config.batches, config.rows, config.seed)
    settings = ctx.settings
    return np.stack([layer_errors(samples[group.name], matmul_weights(unit), sizes, settings.abits, settings.wbits)
                     for (group, unit), sizes in zip(units, candidates)])


def linear_units(graph) -> tuple[list, list, list[list[int]], int]:
    """(scale groups, (group, Linear) per Linear in graph order, its candidate sizes, the hidden width)."""
    groups = find_scale_groups(graph)
    units = [(group, unit) for group in groups for unit in group.consumers]
    widths = [matmul_weights(unit).shape[0] for _, unit in units]
    hidden = int(np.bincount(widths).argmax()) if widths else 0
    return groups, units, [scaled_sizes(k, hidden) for k in widths], hidden


class QditGroups(Pass):
    """Group-wise W and dynamic per-token-group X along K, group size per layer from an evolutionary search."""

    name = "qdit_groups"
    Config = QditGroupsConfig

    def requires(self, ctx: CompileContext) -> None:
        if not (self.config.sizes or self.config.uniform) or not self.config.dynamic:
            self.require_calibration(ctx, "for the group-size search (sampled layer inputs) or static ranges")

    def call(self, ctx: CompileContext) -> PassResult:
        groups, units, candidates, hidden = linear_units(ctx.graph)
        if not units:
            return PassResult(False, ("no Linear reads an activation",))
        started = time.perf_counter()
        notes = []
        if self.config.uniform:
            choice = np.full(len(units), PAPER_SIZES.index(self.config.uniform))
        elif self.config.sizes:
            if len(self.config.sizes) != len(units):
                raise QCompileError(f"qdit_groups: {len(self.config.sizes)} sizes given for {len(units)} Linears "
                                    "(one per Linear in graph order)")
            choice = np.array([PAPER_SIZES.index(s) for s in self.config.sizes])
        else:
            choice, errors = self._search(ctx, groups, units, candidates)
            notes.append(f"search: {len(units)} layers × {len(PAPER_SIZES)} sizes, proxy Σ relative output error "
                         f"{errors[np.arange(len(units)), choice].sum():.4g} in {time.perf_counter() - started:.1f} s")
        static = self._static_ranges(ctx, groups) if not self.config.dynamic else {}
        chosen = [candidates[i][c] for i, c in enumerate(choice)]
        for (group, unit), size, paper in zip(units, chosen, choice):
            ctx.dynamic_group_plans[unit.node.name] = self._plan(ctx, group, unit, size, PAPER_SIZES[paper],
                                                                 static.get(group.name))
        mean = float(np.mean([PAPER_SIZES[c] for c in choice]))
        notes.insert(0, f"{len(units)} Linears group-wise (hidden {hidden}: sizes {scaled_sizes(hidden, hidden)} "
                        f"for the paper's {list(PAPER_SIZES)}); chosen {_counts(chosen)}"
                        f", mean paper-scale size {mean:.0f} (budget {self.config.budget:g})")
        notes.append(f"sizes={[PAPER_SIZES[c] for c in choice]}")  # paper-scale, graph order: replay with `sizes`
        return PassResult(False, tuple(notes))  # plans only: the target lowers them

    def _search(self, ctx, groups, units, candidates):
        errors = error_table(ctx, groups, units, candidates, self.config)
        best, _ = evolve(errors, self.config.budget, self.config)
        return best, errors

    def _static_ranges(self, ctx, groups) -> dict:
        stats = ctx.statistics({g.name: -1 for g in groups}, progress=False)
        return {name: (stat.channel_min, stat.channel_max) for name, stat in stats.items()}

    def _plan(self, ctx, group, unit, size: int, paper: int, channel_range) -> DynamicGroupPlan:
        settings = ctx.settings
        static = None
        if channel_range is not None:  # one range per group: the min/max of its channels, widened to hold 0
            low = np.minimum(channel_range[0].reshape(-1, size).min(axis=1), 0.0)
            high = np.maximum(channel_range[1].reshape(-1, size).max(axis=1), 0.0)
            scale = np.maximum((high - low) / (2**settings.abits - 1), 1e-12).astype(np.float32)
            zero = np.clip(np.rint(-low / scale), 0, 2**settings.abits - 1).astype(np.float32)
            static = (scale.reshape(1, -1, 1), zero.reshape(1, -1, 1))
        return DynamicGroupPlan(unit.node.name, group.name, size, paper, settings.abits, settings.wbits, static)
