"""quantize_weights: int8 per-channel DequantizeLinear weights and int4 MatMulNBits, vs numpy reference."""

import numpy as np
import pytest

from qcompiler.passes import QuantizeWeights
from qcompiler.lowering.matmul_nbits import dequantize_matmul_nbits, quantize_int4_blocks
from qcompiler.quant import QuantSpec, fake_quantize, sqnr_db
from tests import graphs
from tests.passes.helpers import context, run_model


def _weights(model):
    return {init.name: __import__("onnx").numpy_helper.to_array(init) for init in model.graph.initializer}


def test_int8_weights_match_reference():
    model = graphs.linear_model(k=16, n=8)
    ctx = context(model, {"x": (2, 4, 16)})
    result = QuantizeWeights().call(ctx)
    assert result.modified
    quantized = ctx.model()
    assert [n.op_type for n in quantized.graph.node].count("DequantizeLinear") == 1
    weights = _weights(model)
    w_hat = fake_quantize(weights["W"], QuantSpec(bits=8, symmetric=True, granularity="axis", axis=1))
    x = np.random.default_rng(3).standard_normal((2, 4, 16)).astype(np.float32)
    expected = np.maximum(x @ w_hat + weights["b"], 0)
    # Same float math on both sides: only summation order differs (float32 rounding). ORT's optimizer
    # would fuse a weight-only DQ→MatMul into MatMulNBits with run-time int8 activations, so the
    # pass's own math is checked unoptimized.
    np.testing.assert_allclose(run_model(quantized, {"x": x}, optimize=False), expected, rtol=1e-5, atol=1e-5)
    assert ctx.records[0].spec == "int8 sym per-axis(1)"


def test_variable_weight_is_left_alone():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)})
    assert not QuantizeWeights().call(ctx).modified and ctx.records == []


def test_conv_weights_per_output_channel():
    ctx = context(graphs.conv_model(), {"x": (1, 4, 8, 8)})
    assert QuantizeWeights().call(ctx).modified
    axes = [a.i for n in ctx.model().graph.node if n.op_type == "DequantizeLinear" for a in n.attribute]
    assert axes == [0, 0]


@pytest.mark.parametrize("block_size", [32, 64])
def test_int4_matmul_nbits_packing_is_exact(block_size):
    model = graphs.linear_model(k=128, n=16, bias=False)
    ctx = context(model, {"x": (2, 4, 128)}, wbits=4)
    ctx.settings = ctx.settings.__class__(wbits=4, abits=8, block_size=block_size)
    QuantizeWeights(QuantizeWeights.Config(nbits_accuracy_level=0)).call(ctx)
    quantized = ctx.model()
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits", "Relu"]
    w = _weights(model)["W"]
    q, scales = quantize_int4_blocks(w, block_size)
    x = np.random.default_rng(4).standard_normal((2, 4, 128)).astype(np.float32)
    expected = np.maximum(x @ dequantize_matmul_nbits(q, scales, block_size), 0)
    np.testing.assert_allclose(run_model(quantized, {"x": x}), expected, rtol=1e-4, atol=1e-4)


def test_int4_accuracy_level_4_error_bound():
    model = graphs.linear_model(k=128, n=16, bias=False)
    ctx = context(model, {"x": (2, 4, 128)}, wbits=4)
    QuantizeWeights().call(ctx)
    w = _weights(model)["W"]
    q, scales = quantize_int4_blocks(w, 32)
    x = np.random.default_rng(5).standard_normal((2, 4, 128)).astype(np.float32)
    expected = np.maximum(x @ dequantize_matmul_nbits(q, scales, 32), 0)
    # accuracy_level 4 also quantizes A to int8 per block of 32 at run time: relative error per
    # element ≤ 1/254 of the block's max, i.e. SQNR well above 30 dB against the int4-weight reference.
    assert sqnr_db(expected, run_model(ctx.model(), {"x": x})) > 30


@pytest.mark.parametrize("wbits, searched", [(8, False), (4, True)])
def test_clip_search_max_bits_limits_the_search_to_narrow_weights(wbits, searched):
    """dgq's setting (clip_search_max_bits=4): min/max int8 weights, clip-searched int4 weights."""
    from qcompiler.passes.quantize_weights import QuantizeWeightsConfig

    model = graphs.linear_model(k=64, n=8)
    heavy = np.random.default_rng(1).standard_t(2, (64, 8)).astype(np.float32)  # the search clips these
    model.graph.initializer[[i.name for i in model.graph.initializer].index("W")].CopyFrom(
        __import__("onnx").numpy_helper.from_array(heavy, "W"))
    scales = {}
    for search in (False, True):
        config = QuantizeWeightsConfig(clip_search=search, clip_search_max_bits=4)
        ctx = context(model, {"x": (2, 4, 64)}, wbits=wbits)
        QuantizeWeights(config).call(ctx)
        scales[search] = [v for k, v in _weights(ctx.model()).items() if k.endswith("scale")][0]
    assert np.array_equal(scales[False], scales[True]) != searched
