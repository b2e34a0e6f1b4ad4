"""smooth_scales (SmoothQuant): s = max|X|^α / max|W|^(1−α), exact, and the outlier leaves the activation."""

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.calibration.readers import load_calibration
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.graph import load_model
from qcompiler.models import DIGITS_VIT as BUNDLED_DEFAULT
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.passes import SmoothScales
from qcompiler.passes.smooth_scales import smooth_scale
from qcompiler.verify import compare_models
from tests import fold_graphs, graphs
from tests.passes.helpers import context

QUIET = SmoothScales.Config(progress=False)


def _spread(absmax):
    return float(absmax.max() / np.median(absmax))


def test_scale_formula_clamps_and_leaves_dead_channels():
    scale = smooth_scale(np.array([4.0, 0.0, 1e-12]), np.array([1.0, 2.0, 1.0]), alpha=0.5)
    # sqrt(4)/sqrt(1) = 2; a channel that never fired keeps 1; tiny ones clamp at 1e-5.
    np.testing.assert_allclose(scale, [2.0, 1.0, 1e-5])


def test_outlier_channel_moves_into_weights():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)})
    before = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"].channel_absmax
    weight = np.abs(onnx.numpy_helper.to_array(next(i for i in ctx.template.graph.initializer
                                                    if i.name == "fc.W"))).max(axis=1)
    assert SmoothScales(QUIET).call(ctx).modified and ctx.fallbacks == []  # the LayerNorm took X/s
    after = ctx.statistics({"ln.out": -1}, progress=False)["ln.out"].channel_absmax
    # α = 0.5: max|X'_j| = max|X_j|/s_j = sqrt(max|X_j|·max|W_j|), so the spread (max/median over
    # channels) of X' is at most sqrt(spread of X × spread of W); here W's outlier row is 40× smaller.
    bound = np.sqrt(_spread(before) * weight.max() / np.median(weight))
    assert _spread(after) <= bound * (1 + 1e-4)
    np.testing.assert_allclose(after, np.sqrt(before * weight), rtol=1e-4)


def test_block_is_exact_with_folds_and_fallback():
    model = fold_graphs.block_model()
    ctx = context(model, {"x": (2, 4, 8)})
    result = SmoothScales(QUIET).call(ctx)
    assert "2 LayerNormalization, 1 explicit, 1 value projection" in result.notes[0]
    assert len(ctx.fallbacks) == 1 and "'gelu'" in ctx.fallbacks[0]  # nothing can absorb a scale through GELU
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_post_ln_block_falls_back_for_every_residual_read():
    model = fold_graphs.block_model(post_ln=True)
    ctx = context(model, {"x": (2, 4, 8)})
    SmoothScales(QUIET).call(ctx)
    # ln1 and ln2 outputs also feed residual Adds, the GELU output has no affine producer.
    assert len(ctx.fallbacks) == 3
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_alpha_search_stays_exact_and_picks_from_the_grid():
    model = fold_graphs.block_model()
    ctx = context(model, {"x": (2, 4, 8)})
    config = SmoothScales.Config(search_alpha=True, alpha_grid=(0.25, 0.5, 0.75), progress=False)
    result = SmoothScales(config).call(ctx)
    low, high = (float(v) for v in result.notes[1].split("from ")[1].split(" (")[0].split(" to "))
    assert {low, high} <= {0.25, 0.5, 0.75}
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_no_linear_with_constant_weight_is_no_match():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)})
    assert not SmoothScales(QUIET).call(ctx).modified


def test_requires_calibration():
    with pytest.raises(PassError, match="calibration"):
        SmoothScales(QUIET).requires(CompileContext(fold_graphs.block_model(), QuantSettings()))


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(search_alpha=True, alpha_grid=())])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        SmoothScales.Config(**bad)


def test_bundled_model_stays_exact():
    model = load_model(BUNDLED_DEFAULT)
    batches = load_calibration(BUNDLED_DEFAULT.with_suffix(".calib"), model)
    ctx = CompileContext(model, QuantSettings(), batches)
    assert SmoothScales(QUIET).call(ctx).modified
    assert compare_models(model, ctx.model(), batches) <= EXACT_RTOL


def test_recipe_lowers_to_integer_kernels():
    calibration = [{"x": np.random.default_rng(i).standard_normal((4, 8, 16)).astype(np.float32)} for i in range(4)]
    result = qcompiler.quantize(fold_graphs.outlier_model(), "smoothquant", calibration,
                                options=CompileOptions(progress=False))
    assert [p["name"] for p in result.report["passes"]] == ["smooth_scales", "quantize_weights",
                                                            "insert_activation_qdq", "lower"]
    assert result.report["integer_kernels"]["integer_gemms"] == result.report["quantized_gemms"] == 1
