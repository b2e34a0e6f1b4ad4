"""screened_argmin: screening on a row subset, the finalists scored on all rows, candidates in parallel."""

import numpy as np

from qcompiler import scale_search
from qcompiler.folding import find_scale_groups
from qcompiler.passes.shift_scale import ShiftScaleConfig
from qcompiler.scale_search import OutputError, sample_inputs, screened_argmin
from tests import fold_graphs
from tests.passes.helpers import context


def _probe(batch: int):
    ctx = context(fold_graphs.outlier_model(n=64), {"x": (batch, 8, 16)})
    (group,) = find_scale_groups(ctx.graph)
    stats = ctx.statistics({group.name: -1}, progress=False)[group.name]
    samples = sample_inputs(ctx, [group], 4, 1024)[group.name]
    probe = OutputError(samples, group, stats, None, ctx.settings)
    absmax = np.maximum(np.abs(stats.channel_max), np.abs(stats.channel_min))
    return probe, [np.maximum(1.0, absmax / t) for t in np.geomspace(absmax.max(), 1.0, 20)]


def test_without_screening_it_is_the_plain_argmin_in_parallel_or_not(monkeypatch):
    probe, scales = _probe(batch=32)
    errors = [probe(scale) for scale in scales]
    for workers in (1, 2):
        monkeypatch.setattr(scale_search, "_workers", lambda workers=workers: workers)
        assert screened_argmin(probe, scales, 1, 3) == (int(np.argmin(errors)), min(errors))


def test_screening_scores_finalists_on_all_rows_and_stays_near_the_full_best():
    probe, scales = _probe(batch=32)  # 4 batches × 256 rows: 1024 sampled rows, screened on 256
    assert probe.rows >= 4 * scale_search.SCREEN_MIN_ROWS
    errors = [probe(scale) for scale in scales]
    coarse = probe.subset(4)
    assert coarse.rows == probe.rows // 4 and coarse.weights is probe.weights
    screen = [coarse(scale) for scale in scales]
    finalists = set(np.argsort(screen, kind="stable")[:3].tolist())
    best, error = screened_argmin(probe, scales, 4, 3)
    assert best in finalists and error == errors[best]  # the pick's error is its full-rows error
    assert error <= 1.05 * min(errors)


def test_too_few_rows_are_not_screened():
    probe, scales = _probe(batch=4)  # 128 rows: a 1/4 subset would hold 32
    errors = [probe(scale) for scale in scales]
    assert screened_argmin(probe, scales, ShiftScaleConfig().screen, 3) == (int(np.argmin(errors)), min(errors))
