"""The TensorRT rule checker: a graph that follows every rule passes, and each rule broken by hand fails it.

Graphs are written in ONNX text (``onnx.parser``): x → Q/DQ (int8, zero point 0) → MatMul with an
int8 per-output-channel weight DQ, an attention block (MatMul of two activations → Softmax → MatMul)
left float, a Conv with its weight DQ on axis 0, and an int4 MatMul weight blocked along K.
"""

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from qcompiler.targets.tensorrt_rules import check

K, N, T = 64, 8, 4


def _model(body: str, inits: dict, opset: int = 21) -> onnx.ModelProto:
    text = f"""
    <ir_version: 10, opset_import: ["" : {opset}]>
    g (float[2, {T}, {K}] x, float[1, 4, 6, 6] image) => (float[2, {T}, {N}] y, float[2, {T}, {T}] p,
                                                           float[1, 8, 4, 4] c, float[2, {T}, {N}] y4) {{
    {body}
    }}"""
    model = onnx.parser.parse_model(text)
    for name, value in inits.items():
        model.graph.initializer.append(value if isinstance(value, onnx.TensorProto) else
                                       numpy_helper.from_array(value, name))
        model.graph.initializer[-1].name = name
    return model


def _inits(**overrides) -> dict:
    import ml_dtypes

    rng = np.random.default_rng(0)
    inits = {
        "s_x": np.array(0.05, np.float32), "z_x": np.array(0, np.int8),
        "w_q": rng.integers(-127, 128, (K, N)).astype(np.int8), "w_s": np.full(N, 0.01, np.float32),
        "w_z": np.zeros(N, np.int8),
        "c_q": rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8), "c_s": np.full(8, 0.02, np.float32),
        "s_i": np.array(0.1, np.float32),
        "b4_q": numpy_helper.from_array(rng.integers(-7, 8, (K, N)).astype(ml_dtypes.int4), "b4_q"),
        "b4_s": np.full((K // 32, N), 0.1, np.float32),
    }
    inits.update(overrides)
    return inits


VALID = """
    xq = QuantizeLinear(x, s_x, z_x)
    xd = DequantizeLinear(xq, s_x, z_x)
    w = DequantizeLinear <axis = 1> (w_q, w_s, w_z)
    y = MatMul(xd, w)
    kt = Transpose <perm = [0, 2, 1]> (x)
    scores = MatMul(x, kt)
    p = Softmax <axis = -1> (scores)
    iq = QuantizeLinear(image, s_i, z_x)
    idq = DequantizeLinear(iq, s_i, z_x)
    cw = DequantizeLinear <axis = 0> (c_q, c_s)
    c = Conv <kernel_shape = [3, 3]> (idq, cw)
    w4 = DequantizeLinear <axis = 0, block_size = 32> (b4_q, b4_s)
    y4 = MatMul(x, w4)
"""


def _rules(model) -> set[str]:
    return {v.rule for v in check(model)}


def test_a_graph_that_follows_every_rule_passes():
    model = _model(VALID, _inits())
    onnx.checker.check_model(model, full_check=True)
    assert check(model) == []


def test_asymmetric_zero_point_fails():
    assert _rules(_model(VALID, _inits(z_x=np.array(3, np.int8)))) == {"zero-point-0"}


def test_unsigned_activation_fails_even_with_zero_point_0():
    assert _rules(_model(VALID, _inits(z_x=np.array(0, np.uint8)))) == {"zero-point-0"}


def test_weight_scales_on_the_input_axis_fail():
    body = VALID.replace("w = DequantizeLinear <axis = 1> (w_q, w_s, w_z)", "w = DequantizeLinear <axis = 0> (w_q, w_s, w_z)")
    broken = _inits(w_s=np.full(K, 0.01, np.float32), w_z=np.zeros(K, np.int8))
    assert _rules(_model(body, broken)) == {"weight-axis"}


def test_conv_weight_scales_on_axis_1_fail():
    body = VALID.replace("cw = DequantizeLinear <axis = 0> (c_q, c_s)", "cw = DequantizeLinear <axis = 1> (c_q, c_s)")
    assert _rules(_model(body, _inits(c_s=np.full(4, 0.02, np.float32)))) == {"weight-axis"}


def test_int8_weight_without_dequantize_fails():
    body = VALID.replace("w = DequantizeLinear <axis = 1> (w_q, w_s, w_z)", "w = Cast <to = 1> (w_q)")
    # (the int8 activation then also feeds a MatMul with no quantized weight: qdq-placement)
    assert "weight-dq-only" in _rules(_model(body, _inits()))


def test_weight_quantized_at_run_time_fails():
    body = VALID.replace("w = DequantizeLinear <axis = 1> (w_q, w_s, w_z)",
                         "wf = Cast <to = 1> (w_q)\n wq = QuantizeLinear(wf, s_x, z_x)\n w = DequantizeLinear(wq, s_x, z_x)")
    # wf is computed, so its Q counts as an activation; the int8 constant itself has no DQ
    assert "weight-dq-only" in _rules(_model(body, _inits()))


def test_qdq_on_a_softmax_fails():
    body = VALID.replace("p = Softmax <axis = -1> (scores)", "pf = Softmax <axis = -1> (scores)\n"
                         " pq = QuantizeLinear(pf, s_x, z_x)\n p = DequantizeLinear(pq, s_x, z_x)")
    assert _rules(_model(body, _inits())) == {"qdq-placement"}


def test_qdq_into_an_attention_bmm_fails():
    body = VALID.replace("scores = MatMul(x, kt)", "scores = MatMul(xd, kt)")
    assert _rules(_model(body, _inits())) == {"qdq-placement"}


def test_block_dq_on_the_output_axis_fails():
    import ml_dtypes

    body = VALID.replace("w4 = DequantizeLinear <axis = 0, block_size = 32> (b4_q, b4_s)",
                         "w4 = DequantizeLinear <axis = 1, block_size = 4> (b4_q, b4_s)")
    q = np.random.default_rng(1).integers(-7, 8, (K, N)).astype(ml_dtypes.int4)
    broken = _inits(b4_q=numpy_helper.from_array(q, "b4_q"), b4_s=np.full((K, N // 4), 0.1, np.float32))
    violations = [v for v in check(_model(body, broken))]
    assert {v.rule for v in violations} == {"block-dq"}
    assert any("reduction axis" in v.message for v in violations)


def test_block_dq_below_opset_21_fails():
    # opset 21 is where block_size exists; a model declaring less breaks the rule (and ONNX)
    assert "block-dq" in _rules(_model(VALID, _inits(), opset=19))


def test_run_time_scale_fails():
    body = VALID.replace("xq = QuantizeLinear(x, s_x, z_x)\n    xd = DequantizeLinear(xq, s_x, z_x)",
                         "amax = ReduceMax <keepdims = 0> (x)\n    xq = QuantizeLinear(x, amax, z_x)\n"
                         "    xd = DequantizeLinear(xq, amax, z_x)")
    assert _rules(_model(body, _inits())) == {"constant-scale"}


def test_contrib_integer_ops_fail():
    body = VALID.replace("y = MatMul(xd, w)", "y = MatMulInteger(xq, w_q)")
    # MatMulInteger also leaves the int8 weight without a DQ and the activation DQ unread
    assert {"standard-ops", "weight-dq-only"} <= _rules(_model(body, _inits()))


ELEMENTWISE = "y0 = MatMul(x, w)\n yq = QuantizeLinear(y0, s_x, z_x)\n yd = DequantizeLinear(yq, s_x, z_x)\n"


@pytest.mark.parametrize("reader", ["y = Relu(yd)", "other = Relu(y0)\n y = Add(yd, other)"])
def test_qdq_feeding_an_elementwise_op_without_a_gemm_partner_fails(reader):
    body = VALID.replace("y = MatMul(xd, w)", ELEMENTWISE + reader)
    assert _rules(_model(body, _inits())) == {"qdq-placement"}


def test_residual_add_of_a_gemm_output_is_allowed():
    # TensorRT fuses a DQ-fed Add into the GEMM that writes its other input (the residual rule)
    body = VALID.replace("y = MatMul(xd, w)", ELEMENTWISE + "other = MatMul(xd, w)\n y = Add(yd, other)")
    assert check(_model(body, _inits())) == []
