"""The numpy quantize/dequantize reference: formulas, error bounds, and bit-exact agreement with ORT."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler.quant import (QuantSpec, dequantize, element_params, fake_quantize, params_from_tensor, quantize,
                             scale_zero_point, sqnr_db)
from qcompiler.runtimes.ort import make_session
from tests.graphs import init, make_model


def test_asymmetric_formula():
    spec = QuantSpec(bits=8)
    scale, zero_point = scale_zero_point(-1.0, 3.0, spec)
    assert scale == pytest.approx(4.0 / 255)           # s = (max − min)/(2^b − 1)
    assert zero_point == np.rint(1.0 / (4.0 / 255))     # z = round(−min/s)


def test_symmetric_formula_and_range():
    spec = QuantSpec(bits=8, symmetric=True)
    scale, zero_point = scale_zero_point(-2.0, 1.0, spec)
    assert scale == pytest.approx(2.0 / 127) and zero_point == 0   # s = max|x|/(2^(b−1) − 1)
    assert (spec.qmin, spec.qmax) == (-127, 127)


def test_range_widened_to_include_zero():
    # An all-positive tensor still represents 0 exactly (zero point inside the range).
    scale, zero_point = scale_zero_point(2.0, 4.0, QuantSpec(bits=8))
    assert zero_point == 0 and scale == pytest.approx(4.0 / 255)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_bound_and_levels(bits, symmetric):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((6, 50)).astype(np.float32)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    scale, zero_point = params_from_tensor(x, spec)
    x_hat = fake_quantize(x, spec, scale, zero_point)
    # Inside the calibrated range, rounding error is at most half a step (plus float32 slack).
    assert np.max(np.abs(x - x_hat)) <= scale / 2 * (1 + 1e-5)
    assert len(np.unique(x_hat)) <= 2**bits


def test_axis_block_and_group_granularity_use_their_own_ranges():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32) * np.linspace(0.1, 10, 64, dtype=np.float32)
    per_tensor = sqnr_db(x, fake_quantize(x, QuantSpec(bits=4, symmetric=True)))
    per_block = sqnr_db(x, fake_quantize(x, QuantSpec(bits=4, symmetric=True, granularity="block", axis=1,
                                                     block_size=16)))
    labels = np.repeat(np.arange(4), 16)
    per_group = sqnr_db(x, fake_quantize(x, QuantSpec(bits=4, granularity="groups", axis=1), group_labels=labels))
    # Channel scales grow 100× across the axis: finer granularity must be strictly more accurate.
    assert per_block > per_tensor + 3 and per_group > per_tensor + 3
    scale, _ = params_from_tensor(x, QuantSpec(bits=4, symmetric=True, granularity="block", axis=1, block_size=16))
    assert scale.shape == (4, 4)
    np.testing.assert_allclose(scale[0, 0], np.abs(x[0, :16]).max() / 7, rtol=1e-6)


def _ort_qdq(x, scale, zero_point, axis):
    zero_dtype = TensorProto.UINT8 if zero_point.dtype == np.uint8 else TensorProto.INT8
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                       [helper.make_tensor_value_info("q", zero_dtype, list(x.shape)),
                        helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                       [init("s", scale), init("z", zero_point)])
    return make_session(model, optimize=False).run(["q", "y"], {"x": x})


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=True, granularity="axis", axis=1)])
def test_bit_exact_with_onnxruntime(spec):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 12)) * 3).astype(np.float32)
    x[0, :4] = [0.5, -0.5, 1.5, 2.5]  # ties: round-half-to-even must agree
    scale, zero_point = params_from_tensor(x, spec)
    q = quantize(x, scale, zero_point, spec, axis=spec.axis)
    ort_q, ort_y = _ort_qdq(x, scale, zero_point, axis=spec.axis if spec.axis is not None else 1)
    np.testing.assert_array_equal(q, ort_q)
    np.testing.assert_array_equal(dequantize(q, scale, zero_point, axis=spec.axis), ort_y)


def test_invalid_specs_rejected():
    with pytest.raises(ValueError):
        QuantSpec(bits=9)
    with pytest.raises(ValueError):
        QuantSpec(granularity="block", axis=0)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), magnitude=st.sampled_from([1e-4, 1.0, 300.0, 1e6]),
       seed=st.integers(0, 2**16), granularity=st.sampled_from(["tensor", "axis", "block"]))
def test_float32_fake_quantize_equals_float64_route(bits, symmetric, magnitude, seed, granularity):
    """fake_quantize works in float32 in place; the result must equal s·(clip(rint(x/s) + z) − z)
    computed in float64 and rounded once, bit for bit (outliers far outside the range included)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 64)) * magnitude).astype(np.float32)
    x[0, 0] = np.float32(magnitude * 1e4)  # clipped outlier
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, axis=1, block_size=16)
    scale, zero_point = params_from_tensor(x, spec)
    s, z = element_params(x, spec, np.asarray(scale), np.asarray(zero_point))
    q = np.clip(np.rint(x / s.astype(np.float32)).astype(np.float64) + z.astype(np.float64), spec.qmin, spec.qmax)
    expected = ((q - z.astype(np.float64)) * s.astype(np.float32).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(fake_quantize(x, spec), expected)
