"""The output-error probe that scale searches score candidates with (OS+, SmoothQuant's α, Q-DiT).

A scale search (``passes/shift_scale``, ``passes/smooth_scales``, ``passes/qdit_groups``; DMQ's LES
training reads the same weights) draws rows of each scaled activation X once, then scores every
candidate s by the quantized consumers' output error on those rows:

    error(s) = Σ_consumers ‖(X − z)·W − Q_a((X − z)/s)·Q_w(s·W)‖²

Core, not a pass: several passes share it, and ``passes/`` holds passes only.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qcompiler.calibration.row_samples import RowSamples
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.folding import ScaleGroup
from qcompiler.patterns import Linear, match_linear, weight_array
from qcompiler.quant import QuantSpec, fake_quantize, scale_zero_point


#: Fewest rows a screening subset keeps (``screened_argmin``); below it every candidate is scored in full.
SCREEN_MIN_ROWS = 128


def sample_inputs(ctx: CompileContext, groups: list[ScaleGroup], batches: int, rows: int, seed: int = 0
                  ) -> RowSamples:
    """Up to ``rows`` rows (channels last) of each group's X from the first ``batches`` calibration batches.

    Rows are drawn uniformly without replacement per batch, from a generator seeded by (seed,
    tensor, batch), inside ORT where shapes allow (``calibration.row_samples``): one forward
    pass per batch. The rows go to scratch files (``ctx.spill``) and the weight pages the forward
    passes read are released, so the searches that follow hold neither.
    """
    from qcompiler.calibration.row_samples import sampled_rows

    axes = {group.name: group.channel_axis for group in groups}  # first occurrence keeps its position
    return sampled_rows(ctx, ctx.calibration[:batches], axes, rows, seed)


def statistics_and_samples(ctx: CompileContext, groups: list[ScaleGroup], batches: int, rows: int, seed: int = 0,
                           progress: bool = True) -> tuple[dict, RowSamples]:
    """``ctx.statistics`` of the groups' activations and ``sample_inputs``' rows of them.

    In process, the rows are drawn in the statistics' own forward passes (``RowSampler`` riding
    on ``reductions.collect_ranges``): one pass over the calibration data instead of two, the
    same ranges and rows bit for bit. Where the statistics are cached already, or computed on a
    cluster, the rows take passes of their own."""
    from qcompiler.calibration.row_samples import RowSampler

    axes = {group.name: group.channel_axis for group in groups}
    sampled = ctx.calibration[:batches]
    sampler = RowSampler(axes, -(-rows // max(len(sampled), 1)), seed, list(axes), len(sampled), ctx.threads,
                         keep=ctx.spill)
    stats = ctx.statistics(axes, progress=progress, rows=sampler if ctx.cluster is None else None, per_index=False)
    if not sampler.done:
        return stats, sample_inputs(ctx, groups, batches, rows, seed)
    return stats, RowSamples(sampler.samples, rows)


def matmul_weights(unit: Linear) -> np.ndarray:
    """The current weight as it multiplies X from the right, [K, N] (Gemm's transB and α applied)."""
    unit = match_linear(unit.node)  # a fold may have replaced a shared weight by a copy
    weight = weight_array(unit).astype(np.float32)
    weight = weight.T if unit.weight_in_axis == 1 else weight
    return weight * np.float32(unit.node.attrs.get("alpha", 1.0)) if unit.node.op == "Gemm" else weight


class OutputError:
    """error(s) = Σ_consumers ‖(X − z)·W − Q_a((X − z)/s)·Q_w(s·W)‖² on sample rows of X.

    Q_a: per-tensor asymmetric ``abits`` over the calibrated range of X' (channel min/max mapped
    through (· − z)/s); Q_w: symmetric ``wbits`` per output channel, or blocks along K for a W4
    MatMul (its MatMulNBits lowering). The references (X − z)·W do not depend on s: computed once.

    Both weight grids quantize each output column on its own, so the error is a sum over columns:
    a consumer with N > ``columns`` is scored on ``columns`` of them, so that the search cost no
    longer grows with N. A uniform draw alone is unbiased but misses the few columns that carry most
    of the output (transformer FFNs: MiniLM's osplus lost 1.8 dB held-out with 512 of 1536 drawn), so
    half the budget takes the columns of largest reference energy ‖(X − z)·W_n‖² exactly and the other
    half is a seeded uniform draw from the rest, weighted by (rest)/(drawn): still unbiased, with the
    variance of the heavy columns removed.
    """

    def __init__(self, samples: np.ndarray, group: ScaleGroup, stats, shift: np.ndarray | None,
                 settings: QuantSettings, columns: int | None = None, seed: int = 0):
        self.shift = np.zeros(group.channels) if shift is None else shift
        self.centred = (samples - self.shift).astype(np.float32)
        self.low, self.high = stats.channel_min - self.shift, stats.channel_max - self.shift
        self.weights, self.column_weights = [], []
        self.references = []
        for index, unit in enumerate(group.consumers):
            weight = matmul_weights(unit)
            reference = self.centred @ weight
            share = np.ones(weight.shape[1])
            if columns is not None and weight.shape[1] > columns:
                kept, share = column_draw(np.square(reference, dtype=np.float64).sum(axis=0), columns,
                                           np.random.default_rng([seed, index, weight.shape[1]]))
                weight, reference = weight[:, kept], reference[:, kept]
            self.column_weights.append(share)
            self.weights.append(weight)
            self.references.append(reference)
        self.a_spec = QuantSpec(bits=settings.abits, symmetric=False)
        self.w_specs = [QuantSpec(bits=4, symmetric=True, granularity="block", axis=0,
                                  block_size=settings.block_size)
                        if settings.wbits == 4 and unit.node.op == "MatMul"
                        else QuantSpec(bits=settings.wbits, symmetric=True, granularity="axis", axis=1)
                        for unit in group.consumers]

    @property
    def rows(self) -> int:
        return self.centred.shape[0]

    def subset(self, step: int) -> OutputError:
        """The same probe on every ``step``-th sample row (same columns, grids and weights): an
        estimate of the error at 1/step of the cost, for screening candidates."""
        probe = copy.copy(self)
        probe.centred = self.centred[::step]
        probe.references = [reference[::step] for reference in self.references]
        return probe

    def __call__(self, scale: np.ndarray) -> float:
        a_scale, a_zero = scale_zero_point(float(np.min(self.low / scale)), float(np.max(self.high / scale)),
                                           self.a_spec)
        x_hat = fake_quantize((self.centred / scale).astype(np.float32), self.a_spec, a_scale, a_zero)
        error = 0.0
        for weight, reference, spec, share in zip(self.weights, self.references, self.w_specs, self.column_weights):
            w_hat = fake_quantize((weight * scale[:, None]).astype(np.float32), spec)
            error += float(np.square(reference - x_hat @ w_hat, dtype=np.float64).sum(axis=0) @ share)
        return error


def screened_argmin(probe: OutputError, candidates: list[np.ndarray], step: int, finalists: int
                    ) -> tuple[int, float]:
    """(index, error) of the candidate scale of least ``probe`` error, scoring on all rows only the
    ``finalists`` best on every ``step``-th row (``step`` ≤ 1, or too few rows: every candidate on
    all rows). The row GEMM is most of a probe's cost, so a 20-point grid costs 20/step + finalists
    full probes instead of 20; the pick equals the full search's whenever its best candidate is among
    the screen's ``finalists`` (measured: docs/algorithms.md §5.1)."""
    from threadpoolctl import threadpool_limits

    indices = list(range(len(candidates)))
    # Candidates are scored in parallel, one per core, each GEMM on one BLAS thread: the elementwise
    # quantization runs in parallel too, and on a loaded machine a 2-thread BLAS call waits for its
    # slower thread (measured under load ~6 on 2 cores: a 1024×640·640×512 GEMM 6.5 ms on one
    # thread, 17.6 ms on two). Each probe computes the same value either way.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_workers()) as pool:
        if step > 1 and finalists < len(candidates) and probe.rows >= step * SCREEN_MIN_ROWS:
            screen = list(pool.map(probe.subset(step), candidates))
            indices = sorted(np.argsort(screen, kind="stable")[:finalists].tolist())
        errors = dict(zip(indices, pool.map(probe, [candidates[index] for index in indices])))
    best = min(errors, key=lambda index: (errors[index], index))
    return best, errors[best]


def _workers() -> int:
    """Cores this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def column_draw(energy: np.ndarray, columns: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept column indices in order, their weights): the ``columns // 2`` columns of largest
    ``energy`` with weight 1, and a uniform draw of the rest of the budget from the other columns,
    each weighted by how many columns it stands for."""
    heavy = np.argsort(-energy, kind="stable")[: columns // 2]
    rest = np.setdiff1d(np.arange(energy.size), heavy)
    drawn = rng.choice(rest, size=columns - heavy.size, replace=False)
    kept = np.concatenate([heavy, drawn])
    share = np.concatenate([np.ones(heavy.size), np.full(drawn.size, rest.size / drawn.size)])
    order = np.argsort(kept)
    return kept[order], share[order]
