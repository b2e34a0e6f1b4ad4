"""shift_scale (OS+): z = (max + min)/2, s = max(1, r/t*), exact, and W8A8 error below minmax on outliers."""

from collections import Counter

import numpy as np
import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.calibration.readers import load_calibration
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.evaluate import EvalOptions, evaluate
from qcompiler.models import DIGITS_VIT as BUNDLED_DEFAULT
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.graph import load_model
from qcompiler.passes import ShiftScale
from qcompiler.folding import find_scale_groups
from qcompiler.passes.shift_scale import os_plus_parameters
from qcompiler.scale_search import sample_inputs
from qcompiler.quant import sqnr_db
from qcompiler.runtimes.ort import make_session
from qcompiler.verify import compare_models
from tests import fold_graphs, graphs
from tests.passes.helpers import context

QUIET = ShiftScale.Config(progress=False)
PAPER = ShiftScale.Config(try_unshifted=False, progress=False)  # always the paper's centring shift


def _calibration(count=4):
    return [{"x": np.random.default_rng(i).standard_normal((4, 8, 16)).astype(np.float32)} for i in range(count)]


def test_channels_are_centred_and_capped_at_t_star():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)})
    (group,) = find_scale_groups(ctx.graph)
    before = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"]
    samples = sample_inputs(ctx, [group], PAPER.batches, PAPER.rows, PAPER.seed)
    _, shift, threshold = os_plus_parameters(samples["ln.out"], group, before, ctx.settings, PAPER)
    half_range = (before.channel_max - before.channel_min) / 2
    assert 1.0 <= threshold <= half_range.max()  # the grid runs from max_j r_j down to 1
    ShiftScale(PAPER).call(ctx)
    after = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"]
    # (X − z)/s with z the channel centre and s = max(1, r/t*): channel j spans ±min(r_j, t*).
    np.testing.assert_allclose(after.channel_max, np.minimum(half_range, threshold), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after.channel_min, -np.minimum(half_range, threshold), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shift, (before.channel_max + before.channel_min) / 2)


def test_outlier_channel_is_flattened():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)})
    before = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"].channel_absmax
    ShiftScale(QUIET).call(ctx)
    after = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"].channel_absmax
    normal = np.delete(before, 3)
    # The injected channel is 40× wider than the rest with a 40× smaller weight row, so scaling it
    # down to the others' width costs the int8 weights nothing; a t* that left it 2× wider than the
    # widest other channel would waste a bit of the per-tensor activation grid, so the search
    # must bring the spread (max/median) within 2× of the other channels' own spread.
    assert before.max() / np.median(before) > 10 * normal.max() / np.median(normal)  # the outlier is there
    assert after.max() / np.median(after) <= 2 * normal.max() / np.median(normal)


def test_w8a8_error_below_minmax_with_an_outlier_channel():
    model = fold_graphs.outlier_model()
    held_out = np.random.default_rng(99).standard_normal((16, 8, 16)).astype(np.float32)
    reference = make_session(model).run(None, {"x": held_out})[0]
    sqnr = {}
    for recipe in ("minmax", "osplus"):
        result = qcompiler.quantize(model, recipe, _calibration(), options=CompileOptions(progress=False))
        assert result.report["integer_kernels"]["integer_gemms"] == result.report["quantized_gemms"] == 1
        sqnr[recipe] = sqnr_db(reference, make_session(result.model).run(None, {"x": held_out})[0])
    # Under minmax the outlier sets the per-tensor uint8 step for all 16 channels; OS+ removes it,
    # which must gain at least one bit (6 dB) of activation resolution.
    assert sqnr["osplus"] >= sqnr["minmax"] + 6


@pytest.mark.parametrize("config", [QUIET, PAPER])
def test_block_is_exact(config):
    model = fold_graphs.block_model()
    ctx = context(model, {"x": (2, 4, 8)})
    assert ShiftScale(config).call(ctx).modified
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_explicit_fallbacks_are_scale_only_by_default():
    model = fold_graphs.block_model(post_ln=True)
    ctx = context(model, {"x": (2, 4, 8)})
    ShiftScale(QUIET).call(ctx)
    # explicit_shift=False: a Sub per fallback would cost run time and float32 exactness (see module doc).
    assert len(ctx.fallbacks) == 3 and all("(Mul)" in note for note in ctx.fallbacks)
    assert Counter(n.op_type for n in ctx.model().graph.node)["Sub"] == 0
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_samples_are_capped_and_channels_last():
    ctx = context(fold_graphs.conv_chain_model(), {"x": (2, 4, 8, 8)})
    groups = find_scale_groups(ctx.graph, include_conv=True)
    samples = sample_inputs(ctx, groups, batches=2, rows=10)
    assert {name: value.shape for name, value in samples.items()} == {"x": (10, 4), "h": (10, 8)}


def test_no_linear_with_constant_weight_is_no_match():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)})
    assert not ShiftScale(QUIET).call(ctx).modified


def test_requires_calibration():
    with pytest.raises(PassError, match="calibration"):
        ShiftScale(QUIET).requires(CompileContext(fold_graphs.block_model(), QuantSettings()))


def test_bundled_model_stays_exact():
    model = load_model(BUNDLED_DEFAULT)
    batches = load_calibration(BUNDLED_DEFAULT.with_suffix(".calib"), model)
    ctx = CompileContext(model, QuantSettings(), batches)
    assert ShiftScale(QUIET).call(ctx).modified
    assert compare_models(model, ctx.model(), batches) <= EXACT_RTOL


def test_osplus_recipe_on_bundled_model(tmp_path):
    out = tmp_path / "digits.osplus.onnx"
    result = qcompiler.quantize(BUNDLED_DEFAULT, "osplus", BUNDLED_DEFAULT.with_suffix(".calib"), out,
                                CompileOptions(progress=False, verify=True))
    assert result.report["passes"][0]["verify"]["max_relative_error"] <= EXACT_RTOL
    assert result.report["integer_kernels"]["integer_gemms"] == result.report["quantized_gemms"] > 0
    metrics = evaluate(BUNDLED_DEFAULT, out, BUNDLED_DEFAULT.with_suffix(".heldout"), EvalOptions(per_layer=False))
    # Same bound as minmax's end-to-end test: ~25 int8 quantizers in series stay above 30 dB.
    assert metrics["outputs"]["logits"]["sqnr_db"] > 30


def test_column_draw_estimates_the_full_output_error():
    """Scoring 64 of 512 output channels (the 32 heaviest and a weighted draw of 32) tracks the full error:
    within 20 % at every grid point, and the search picks the same or an equally good t*."""
    from qcompiler.passes.shift_scale import search_threshold
    from qcompiler.scale_search import OutputError

    ctx = context(fold_graphs.outlier_model(n=512), {"x": (4, 8, 16)})
    (group,) = find_scale_groups(ctx.graph)
    stats = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"]
    samples = sample_inputs(ctx, [group], PAPER.batches, PAPER.rows, PAPER.seed)["ln.out"]
    full = OutputError(samples, group, stats, None, ctx.settings)
    drawn = OutputError(samples, group, stats, None, ctx.settings, columns=64, seed=0)
    assert drawn.weights[0].shape[1] == 64 and full.weights[0].shape[1] == 512
    absmax = np.maximum(np.abs(stats.channel_max), np.abs(stats.channel_min))
    for t in np.geomspace(absmax.max(), 1.0, 8):
        scale = np.maximum(1.0, absmax / t)
        assert drawn(scale) == pytest.approx(full(scale), rel=0.2)
    zero = np.zeros(group.channels)
    best_full = search_threshold(stats, full, zero, PAPER)
    best_drawn = search_threshold(stats, drawn, zero, PAPER)
    assert full(best_drawn[0]) <= 1.1 * best_full[2]


def test_column_draw_keeps_heavy_columns_and_is_unbiased():
    """The heaviest half of the budget is always scored; the drawn half stands for the rest, so the
    weighted sum estimates the total without bias (mean over seeds) and each draw counts N columns."""
    from qcompiler.scale_search import column_draw

    energy = np.random.default_rng(0).exponential(size=300)
    energy[[7, 123, 250]] = 1000.0   # a few columns that carry most of the output
    estimates = []
    for seed in range(400):
        kept, share = column_draw(energy, 40, np.random.default_rng(seed))
        assert kept.size == 40 and np.all(np.diff(kept) > 0) and {7, 123, 250} <= set(kept.tolist())
        assert share.sum() == pytest.approx(energy.size)
        estimates.append(float(energy[kept] @ share))
    assert np.mean(estimates) == pytest.approx(energy.sum(), rel=0.01)
    # Every estimate is close: the heavy columns' share of the variance is gone.
    assert np.max(np.abs(np.array(estimates) / energy.sum() - 1)) < 0.05
