"""log2_attention: Â = s·2^−clamp(round(−log2(A/s))) at run time, the cross-attention start token exact."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.graph import add_outputs
from qcompiler.passes import Log2Attention
from qcompiler.passes.log2_attention import LOWERING, Log2AttentionConfig, log2_quantize
from qcompiler.runtimes.ort import make_session
from tests import graphs

HEADS, TOKENS, KEYS, WIDTH = 2, 4, 5, 3


def attention_graph(cross: bool, opset: int = 17):
    """softmax(q·kᵀ + mask)·k with q (B, H, T, d); k is q itself (self) or a second input (cross)."""
    keys = KEYS if cross else TOKENS
    source = "kv" if cross else "q"
    nodes = [helper.make_node("Transpose", [source], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="mask_add"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", source], ["y"], name="av")]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", HEADS, TOKENS, WIDTH]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, 1, keys])]
    if cross:
        inputs.append(helper.make_tensor_value_info("kv", TensorProto.FLOAT, ["B", HEADS, KEYS, WIDTH]))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", HEADS, TOKENS, WIDTH])
    return graphs.make_model(nodes, inputs, [output], [], opset=opset)


def inputs(cross: bool, seed: int = 0, masked_column: int | None = None):
    rng = np.random.default_rng(seed)
    keys = KEYS if cross else TOKENS
    # Sample 1 is scaled ×3: sharper attention, so its s differs from sample 0's (s is per sample).
    q = rng.standard_normal((2, HEADS, TOKENS, WIDTH)).astype(np.float32) * np.array([1.0, 3.0]).reshape(2, 1, 1, 1)
    feeds = {"q": q.astype(np.float32), "mask": np.zeros((2, 1, 1, keys), np.float32)}
    if masked_column is not None:
        feeds["mask"][..., masked_column] = -1e30  # exp underflows: A = 0 exactly in that column
    if cross:
        feeds["kv"] = rng.standard_normal((2, HEADS, KEYS, WIDTH)).astype(np.float32) * 2
    return feeds


def quantized_probabilities(cross: bool, config=Log2AttentionConfig(), feeds=None, opset: int = 17):
    """(A from the float graph, Â read at the value MatMul of the rewritten graph, the context)."""
    model = attention_graph(cross, opset)
    ctx = CompileContext(model, QuantSettings())
    result = Log2Attention(config).call(ctx)
    assert result.modified
    rewritten = ctx.model()
    probe = next(n for n in rewritten.graph.node if n.name == "av").input[0]
    feeds = feeds or inputs(cross)
    a = make_session(add_outputs(model, ["probs"])).run(["probs"], feeds)[0]
    a_hat = make_session(add_outputs(rewritten, [probe])).run([probe], feeds)[0]
    return a, a_hat, ctx


def assert_matches_formula(a_hat, a, bits, keep):
    expected = log2_quantize(a, bits, keep)
    rest = a[..., 1:] if keep else a
    s = rest.max(axis=(1, 2, 3), keepdims=True)
    with np.errstate(divide="ignore"):
        exponent = -np.log2(rest.astype(np.float64) / s)
    # ORT's Log and numpy's may differ in the last ulp; that can flip round() only within ~1e-6
    # of a half-integer exponent. Those elements may take either neighbouring level.
    tie = np.abs(np.abs(exponent - np.floor(exponent)) - 0.5) < 1e-5
    if keep:
        tie = np.concatenate([np.zeros_like(tie[..., :1]), tie], axis=-1)
    np.testing.assert_array_equal(a_hat[~tie], expected[~tie])


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax takes axes as an attribute before 18, an input from 18
def test_cross_attention_keeps_the_start_token_exact_and_quantizes_the_rest(opset):
    a, a_hat, ctx = quantized_probabilities(cross=True, opset=opset)
    np.testing.assert_array_equal(a_hat[..., 0], a[..., 0])
    assert_matches_formula(a_hat, a, 8, keep=True)
    record = next(r for r in ctx.records if r.pass_name == "log2_attention")
    assert record.lowering == LOWERING and record.details == {"attention": "cross", "start_token_exact": True}


def test_self_attention_quantizes_every_column():
    a, a_hat, ctx = quantized_probabilities(cross=False)
    assert_matches_formula(a_hat, a, 8, keep=False)
    s = a.max(axis=(1, 2, 3), keepdims=True)
    levels = np.log2(a_hat[..., 0] / s[..., 0])
    np.testing.assert_array_equal(levels, np.round(levels))  # column 0 lies on the grid s·2^−q too
    assert not np.array_equal(a_hat[..., 0], a[..., 0])
    assert ctx.records[0].details["attention"] == "self"


def test_start_token_exemption_is_configurable_per_attention_kind():
    config = Log2AttentionConfig(keep_start_token=("self", "cross"))
    a, a_hat, _ = quantized_probabilities(cross=False, config=config)
    np.testing.assert_array_equal(a_hat[..., 0], a[..., 0])
    assert_matches_formula(a_hat, a, 8, keep=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_probabilities_take_the_smallest_level(bits):
    feeds = inputs(cross=True, masked_column=3)
    a, a_hat, _ = quantized_probabilities(cross=True, config=Log2AttentionConfig(bits=bits), feeds=feeds)
    assert np.all(a[..., 3] == 0) and np.all(np.isfinite(a_hat))
    s = a[..., 1:].max(axis=(1, 2, 3))
    # log2(0) = −inf, so q clamps to 2^b − 1: Â = s·2^−(2^b−1), which float32 rounds to 0 at b = 8.
    smallest = (s * np.float32(2.0) ** np.float32(-(2**bits - 1))).astype(np.float32)
    np.testing.assert_array_equal(a_hat[..., 3], np.broadcast_to(smallest.reshape(2, 1, 1), a_hat[..., 3].shape))


def test_powers_of_two_below_the_maximum_are_exact_levels():
    a = np.array([[[[0.5, 0.25, 0.125, 2.0**-10]]]], np.float32)
    np.testing.assert_array_equal(log2_quantize(a, 8, keep_start_token=False), a)


def test_relative_error_is_within_half_a_level():
    rng = np.random.default_rng(1)
    a = rng.uniform(1e-4, 1.0, (1, 2, 4, 16)).astype(np.float32)
    ratio = log2_quantize(a, 8, keep_start_token=False) / a
    # |round(e) − e| ≤ ½ for e = −log2(A/s), so Â/A = 2^(e − round(e)) lies in [2^−½, 2^½].
    assert ratio.min() >= 2**-0.5 * (1 - 1e-6) and ratio.max() <= 2**0.5 * (1 + 1e-6)


def test_graph_without_attention_is_unchanged():
    ctx = CompileContext(graphs.linear_model(), QuantSettings())
    assert not Log2Attention().call(ctx).modified
    assert ctx.records == []


def test_config_validates_bits_and_kinds():
    with pytest.raises(ValueError, match="bits"):
        Log2AttentionConfig(bits=12)
    with pytest.raises(ValueError, match="keep_start_token"):
        Log2AttentionConfig(keep_start_token=("start",))


@pytest.mark.parametrize("keep", [True, False])
def test_linear_quantizer_matches_its_formula_and_bound(keep):
    """The uniform-grid ablation: Â = s·round(A/s·(2^b−1))/(2^b−1), |A − Â| ≤ s/(2(2^b−1))."""
    from qcompiler.passes.log2_attention import linear_quantize

    bits = 6
    config = Log2AttentionConfig(bits=bits, keep_start_token=("cross",) if keep else (), quantizer="linear")
    a, a_hat, ctx = quantized_probabilities(cross=True, config=config)
    np.testing.assert_allclose(a_hat, linear_quantize(a, bits, keep), rtol=0, atol=1e-7)
    rest, rest_hat = (a[..., 1:], a_hat[..., 1:]) if keep else (a, a_hat)
    s = rest.max(axis=(1, 2, 3), keepdims=True)
    assert np.all(np.abs(rest - rest_hat) <= s / (2 * (2**bits - 1)) + 1e-7)
    if keep:
        np.testing.assert_array_equal(a_hat[..., :1], a[..., :1])
    assert ctx.records[0].spec.startswith("linear uint6")


def test_unknown_quantizer_is_rejected():
    with pytest.raises(ValueError, match="quantizer must be"):
        Log2AttentionConfig(quantizer="cubic")
