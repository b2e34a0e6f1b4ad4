"""pow2_skip_scales (DMQ PTS): voting of m_c ∈ {1, ½, ¼, ⅛} and the exact one-int8-GEMM lowering."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.graph import save_model
from qcompiler.passes import InsertActivationQDQ, Pow2SkipScales, QuantizeWeights
from qcompiler.passes.pow2_skip_scales import channel_range_ratio, fake_quantize_channels, vote
from qcompiler.quant import QuantSpec, quantize_weight, scale_zero_point
from qcompiler.runtimes.ort import count_kernels
from qcompiler.targets.ort import OrtTarget
from tests import graphs
from tests.passes.helpers import run_model

SPEC = QuantSpec(bits=8, symmetric=False)
C = 4


def _config(**overrides):
    return Pow2SkipScales.Config(**{"progress": False, "variance_ratio": None, "clip_search": False, **overrides})


def _calibration(count=6, rows=4, seed=0):
    """h = Relu(x) spans [0, ~60] on wide channels; the skip channels are small (std 0.3–2)."""
    rng = np.random.default_rng(seed)
    wide = np.array([20, 10, 5, 3], np.float32)[None, :, None, None]
    small = np.array([1, 0.5, 2, 0.3], np.float32)[None, :, None, None]
    return [CalibrationBatch({"x": rng.standard_normal((rows, C, 4, 4)).astype(np.float32) * wide,
                              "skip": rng.standard_normal((rows, C, 4, 4)).astype(np.float32) * small},
                             {"__timestep__": np.full(rows, 100 * i)}, f"b{i}") for i in range(count)]


def test_voting_big_range_small_range_and_mixed():
    rng = np.random.default_rng(0)
    samples, positions = 20, 64
    x = np.empty((samples, positions, 4), np.float32)
    x[..., 0] = rng.uniform(-10, 10, (samples, positions))      # spans the tensor range: m = 1
    x[..., 1] = rng.uniform(-0.5, 0.5, (samples, positions))    # tiny in every sample: m = 1/8
    x[..., 2] = rng.uniform(-0.3, 0.3, (samples, positions))
    x[:10, :, 3] = rng.uniform(-0.5, 0.5, (10, positions))      # tiny in half of the samples,
    x[10:, :, 3] = rng.uniform(-9, 9, (10, positions))          # wide in the others: no 85 % majority
    x[0, 0, 0], x[0, 1, 0] = -10.0, 10.0
    scale, zero_point = scale_zero_point(-10.0, 10.0, SPEC)
    multipliers, share = vote(x, None, float(scale), int(zero_point), SPEC)
    np.testing.assert_array_equal(multipliers, [1.0, 0.125, 0.125, 1.0])
    assert share[1] == share[2] == 1.0 and share[3] <= 0.5 + 1e-9
    # items that are rows of one sample vote together (a (B·T, C) input)
    grouped, _ = vote(x, np.repeat(np.arange(10), 2), float(scale), int(zero_point), SPEC)
    np.testing.assert_array_equal(grouped, multipliers)
    assert channel_range_ratio(np.array([-10, -0.5, -0.3, -9]), np.array([10, 0.5, 0.3, 9])) == pytest.approx(20 / 9.5)


def test_skip_concat_is_targeted_and_relu_concat_is_not():
    ctx = CompileContext(graphs.skip_concat_model(c=C), QuantSettings(wbits=4), _calibration())
    result = Pow2SkipScales(_config()).call(ctx)
    assert result.modified and "'shortcut' (skip concat)" in result.notes[1]
    multipliers = next(r for r in ctx.records if r.role == "pts").details["multipliers"]
    assert len(multipliers) == 2 * C and multipliers[0] == 1.0  # the widest channel keeps s
    assert multipliers[-1] == 0.125  # the smallest skip channel (std 0.3) gets an 8× finer grid
    ctx = CompileContext(graphs.skip_concat_model(c=C, feeds_conv=False), QuantSettings(wbits=4), _calibration())
    assert not Pow2SkipScales(_config()).call(ctx).modified


def test_variance_ratio_targets_other_inputs():
    ctx = CompileContext(graphs.conv_model(), QuantSettings(wbits=4),
                         [CalibrationBatch({"x": np.random.default_rng(i).standard_normal((2, 4, 8, 8)).astype(
                             np.float32)}, {}, f"b{i}") for i in range(2)])
    assert Pow2SkipScales(_config(variance_ratio=1.0)).targets(ctx)
    assert not Pow2SkipScales(_config(variance_ratio=1e6)).targets(ctx)


def _reference(model, feeds, ctx, wbits):
    """numpy fake quantization: per-channel activation scale s·m_c, int4/int8 per-channel W, 1×1 conv."""
    record = next(r for r in ctx.records if r.role == "pts")
    multipliers = np.array(record.details["multipliers"], np.float32)
    cat = np.concatenate([np.maximum(feeds["x"], 0), feeds["skip"]], axis=1)
    x_hat = fake_quantize_channels(cat, multipliers, record.details["activation_scale"],
                                   record.details["zero_point"], SPEC, axis=1)
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])  # (C, 2C, 1, 1)
    q, scale, _ = quantize_weight(weight, QuantSpec(bits=wbits, symmetric=True, granularity="axis", axis=0))
    w_hat = (q.astype(np.float32) * scale[:, None, None, None])[:, :, 0, 0]
    return np.einsum("bchw,oc->bohw", x_hat, w_hat), multipliers


def test_w4_lowering_equals_the_numpy_reference_and_runs_one_int8_gemm():
    model = graphs.skip_concat_model(c=C)
    calibration = _calibration()
    ctx = CompileContext(model, QuantSettings(wbits=4), calibration)
    Pow2SkipScales(_config()).call(ctx)
    feeds = _calibration(count=1, seed=5)[0].feeds
    expected, multipliers = _reference(model, feeds, ctx, 4)
    assert np.any(multipliers < 1)
    lowered = ctx.model()
    got = run_model(lowered, feeds, optimize=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    ints = next(onnx.numpy_helper.to_array(i) for i in lowered.graph.initializer if i.name.endswith("int8"))
    assert ints.dtype == np.int8 and np.abs(ints).max() <= 56  # int4 · 2^(3−j) stays in int8

    InsertActivationQDQ().call(ctx)  # the Conv output's grid ...
    OrtTarget().lower(ctx)  # ... and its Q → QLinearConv
    record = next(r for r in ctx.records if r.details.get("position", "").startswith("Conv output"))
    out_scale, out_zero = record.details["scale"], record.details["zero_point"]
    q = np.clip(np.rint(expected / np.float32(out_scale)) + out_zero, 0, 255)
    reference = ((q - out_zero) * np.float32(out_scale)).astype(np.float32)
    integer = run_model(ctx.model(), feeds)
    assert np.max(np.abs(integer - reference)) <= out_scale * 1.0001  # at most one output step (requantization)
    assert np.mean(integer == reference) > 0.95
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pts.onnx"
        save_model(ctx.model(), path)
        kernels = count_kernels(path)
    assert kernels.integer_gemms == 1 and kernels.op_types.get("QLinearConv") == 1


def test_w8_folds_multipliers_before_weight_quantization():
    model = graphs.skip_concat_model(c=C)
    ctx = CompileContext(model, QuantSettings(wbits=8), _calibration())
    Pow2SkipScales(_config()).call(ctx)
    assert not QuantizeWeights().call(ctx).modified  # the pass wrote its own weight DQ
    feeds = _calibration(count=1, seed=5)[0].feeds
    expected, _ = _reference(model, feeds, ctx, 8)
    got = run_model(ctx.model(), feeds, optimize=False)
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert 0 < relative < 0.02  # close, but not bit-identical: Q(W·m) ≠ m·Q(W)
    assert "not bit-identical" in next(r for r in ctx.records if r.role == "pts").lowering


def test_weight_clip_search_never_loses_to_minmax():
    from qcompiler.weight_quant import quantize_weight_clipped
    from qcompiler.quant import element_params

    weight = np.random.default_rng(0).standard_t(3, (16, 40)).astype(np.float32)
    for spec in (QuantSpec(bits=4, symmetric=True, granularity="axis", axis=0),
                 QuantSpec(bits=4, symmetric=True, granularity="block", axis=1, block_size=16)):
        def error(q, scale, spec=spec):
            return float(np.sum((weight - q * element_params(weight, spec, scale, np.zeros_like(scale))[0]) ** 2))

        q, scale, _ = quantize_weight_clipped(weight, spec)
        q0, scale0, _ = quantize_weight(weight, spec)
        assert error(q, scale) < error(q0, scale0)
        q1, scale1, _ = quantize_weight_clipped(weight, spec, ratios=(1.0,))
        np.testing.assert_array_equal(q1, q0)
        np.testing.assert_array_equal(scale1, scale0)
