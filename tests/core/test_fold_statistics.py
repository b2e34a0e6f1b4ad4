"""Statistics kept across equivalence folds (``CompileContext.fold_statistics``) equal recaptured ones.

After a fold X' = (X − z)/s the cache serves X''s ranges derived from X's and keeps every tensor the
fold leaves equivalent; these tests recapture everything on the folded graph (a fresh forward pass,
``statistics(batches=...)``) and compare: a tensor whose values changed but stayed cached would differ
by far more than the float32 rounding allowed here.
"""

import numpy as np
import pytest

from qcompiler.calibration.statistics import TensorStats
from qcompiler.folding import find_scale_groups, fold
from qcompiler.passes import ShiftScale, SmoothScales
from tests import dit_graphs, fold_graphs
from tests.passes.helpers import context

#: float32 rounding of X' computed by the runtime (γ/s, (β − z)/s) against float64 (x − z)/s.
RTOL, ATOL = 1e-5, 1e-6


def _cached_against_recaptured(ctx) -> int:
    """Assert every cached entry equals a fresh capture on the current graph; how many were derived."""
    cache = dict(ctx._stats_cache)
    assert cache, "nothing cached: the test would check nothing"
    fresh = {}
    for (name, axis), stats in cache.items():
        fresh = ctx.statistics({name: axis}, progress=False, batches=ctx.calibration)[name]
        for field in ("channel_min", "channel_max"):
            np.testing.assert_allclose(getattr(stats, field), getattr(fresh, field), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} {field}")
        np.testing.assert_allclose([stats.min, stats.max], [fresh.min, fresh.max], rtol=RTOL, atol=ATOL,
                                   err_msg=name)
        assert stats.samples == fresh.samples and stats.count == fresh.count
        if stats.channel_sum is not None:
            np.testing.assert_allclose(stats.channel_mean, fresh.channel_mean, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} channel mean")
    return sum(key in ctx._derived for key in cache)


@pytest.mark.parametrize("make", [
    lambda: (fold_graphs.block_model(d=8), {"x": (4, 4, 8)}),  # LayerNorm, value projection, explicit (GELU)
    lambda: (fold_graphs.block_model(d=8, post_ln=True), {"x": (4, 4, 8)}),  # explicit shifts/scales only
    lambda: (dit_graphs.modulated_block("linear"), {"x": (4, 4, 8), "c": (4, 8)}),  # AdaLN modulation
], ids=["pre_ln", "post_ln", "adaln"])
@pytest.mark.parametrize("pass_", [ShiftScale(ShiftScale.Config(progress=False)),
                                   SmoothScales(SmoothScales.Config(progress=False))], ids=["osplus", "smoothquant"])
def test_ranges_after_folds_equal_recaptured(make, pass_):
    model, shapes = make()
    ctx = context(model, shapes)
    pass_.call(ctx)
    derived = _cached_against_recaptured(ctx)
    groups = find_scale_groups(ctx.graph)
    assert derived >= len(groups)  # every GEMM input X' is served without a forward pass
    assert all((g.name, -1) in ctx._derived for g in groups)  # the key of axis None (the last) too


def test_derivation_is_the_affine_map_of_the_channel_ranges():
    stats = TensorStats.empty("x", 2, 3, None)
    stats.update_ranges({"channel_min": np.array([-2.0, 0.0, 1.0]), "channel_max": np.array([4.0, 3.0, 5.0]),
                         "channel_sum": np.array([2.0, 6.0, 12.0]), "index_min": np.zeros(4), "index_max": np.ones(4)},
                        samples=2, source="t")
    out = stats.folded("x'", np.array([1.0, 0.0, 3.0]), np.array([3.0, 1.0, 0.5]))
    np.testing.assert_allclose(out.channel_min, [-1.0, 0.0, -4.0])
    np.testing.assert_allclose(out.channel_max, [1.0, 3.0, 4.0])
    assert (out.min, out.max, out.absmax) == (-4.0, 4.0, 4.0)
    np.testing.assert_allclose(out.channel_mean, (stats.channel_mean - [1.0, 0.0, 3.0]) / [3.0, 1.0, 0.5])
    assert out.index_min is None  # per-position ranges mix channels of different s: not derived


def test_per_index_readers_recapture_derived_entries():
    ctx = context(fold_graphs.block_model(d=8), {"x": (4, 4, 8)})
    ShiftScale(ShiftScale.Config(progress=False)).call(ctx)
    name = find_scale_groups(ctx.graph)[0].name
    assert (name, -1) in ctx._derived and ctx.statistics({name: None}, per_index=False)[name].index_min is None
    stats = ctx.statistics({name: None}, progress=False)[name]  # per_index=True: a fresh capture
    assert stats.index_min is not None and (name, -1) not in ctx._derived


def test_fold_drops_what_it_changes_and_keeps_what_it_does_not():
    ctx = context(fold_graphs.block_model(d=8), {"x": (4, 4, 8)})
    groups = {g.name: g for g in find_scale_groups(ctx.graph)}
    ctx.statistics({name: None for name in groups} | {"h": None, "y": None, "v.mm": None}, progress=False)
    kept = {key: ctx._stats_cache[key] for key in [("h", -1), ("y", -1)]}
    group = groups["merged"]  # the out-projection's input: the value projection absorbs it
    channels = group.channels
    fold(ctx, group, np.linspace(1.0, 3.0, channels), np.linspace(-0.5, 0.5, channels), "test")
    assert ("v.mm", -1) not in ctx._stats_cache  # inside the V path: its values changed, dropped
    assert all(ctx._stats_cache[key] is value for key, value in kept.items())  # equivalent: kept as they were
    assert ("merged", -1) in ctx._derived
    _cached_against_recaptured(ctx)


def test_pixart_folds_keep_the_network_cached(tmp_path):
    """PixArt's AdaLN: a fold rewrites a block's scale/shift chunks, not its gate chunks, which feed the
    rest of the network; the statistics cached downstream stay (and equal a recapture), so activation
    quantization after OS+ needs no second calibration pass."""
    from qcompiler.calibration.readers import CalibrationBatch
    from tests.dit_graphs import pixart_model

    model = pixart_model(tmp_path)
    rng = np.random.default_rng(0)
    batches = [CalibrationBatch({"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                                 "timestep": np.array([10.0, 500.0], np.float32),
                                 "encoder_hidden_states": rng.standard_normal((2, 6, 24)).astype(np.float32)},
                                {}, f"b{i}") for i in range(2)]
    from qcompiler.context import CompileContext, QuantSettings

    ctx = CompileContext(model, QuantSettings(), batches)
    ShiftScale(ShiftScale.Config(progress=False)).call(ctx)
    _cached_against_recaptured(ctx)
    collected = []
    ctx._collect = lambda *args, **kwargs: collected.append(args) or {}
    from qcompiler.passes import InsertActivationQDQ, QuantizeWeights

    QuantizeWeights().call(ctx)
    InsertActivationQDQ().call(ctx)
    assert not collected  # every GEMM input and Conv output was served from the cache
