"""insert_activation_qdq: per-tensor static activation QDQ that ORT fuses into integer kernels.

The pass decides the grids; the Conv-output QDQ and the int32 Gemm bias that ORT's fusions need
are the ORT target's (``_compile`` runs it, as every compile does)."""

import numpy as np
import onnx

from qcompiler.passes import InsertActivationQDQ, QuantizeWeights
from qcompiler.quant import QuantSpec, fake_quantize, scale_zero_point
from qcompiler.graph import add_outputs
from qcompiler.runtimes.ort import count_kernels, make_session
from qcompiler.targets.ort import OrtTarget
from tests import graphs
from tests.passes.helpers import context, run_model


def _compile(ctx):
    QuantizeWeights().call(ctx)
    result = InsertActivationQDQ().call(ctx)
    OrtTarget().lower(ctx)
    return result


def test_conv_output_grid_is_recorded_not_inserted_by_the_pass():
    ctx = context(graphs.conv_model(), {"x": (1, 4, 8, 8)})
    QuantizeWeights().call(ctx)
    InsertActivationQDQ().call(ctx)
    assert ctx.output_grids and all(g.spec.bits == 8 for g in ctx.output_grids.values())
    outputs = {grid.tensor for grid in ctx.output_grids.values()}
    # No Q reads a Conv output until the target lowers: a TensorRT-style target would not want it.
    assert not any(n.op == "QuantizeLinear" and n.inputs[0].name in outputs for n in ctx.graph.nodes)


def test_linear_activation_qdq_matches_reference_and_fuses(tmp_path):
    model = graphs.linear_model(k=16, n=8)
    ctx = context(model, {"x": (2, 4, 16)})
    assert _compile(ctx).modified
    quantized = ctx.model()
    calib = np.concatenate([b.feeds["x"] for b in ctx.calibration])
    a_spec = QuantSpec(bits=8)
    a_scale, a_zero = scale_zero_point(calib.min(), calib.max(), a_spec)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w_hat = fake_quantize(weights["W"], QuantSpec(bits=8, symmetric=True, granularity="axis", axis=1))
    x = np.random.default_rng(9).standard_normal((2, 4, 16)).astype(np.float32)
    expected = np.maximum(fake_quantize(x, a_spec, a_scale, a_zero) @ w_hat + weights["b"], 0)
    np.testing.assert_allclose(run_model(quantized, {"x": x}), expected, rtol=1e-5, atol=1e-5)
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    kernels = count_kernels(path)
    assert kernels.integer_gemms == 1 and kernels.float_gemms == 0


def test_conv_inputs_and_outputs_quantized_so_both_convs_fuse(tmp_path):
    ctx = context(graphs.conv_model(), {"x": (1, 4, 8, 8)})
    _compile(ctx)
    path = tmp_path / "q.onnx"
    onnx.save(ctx.model(), path)
    kernels = count_kernels(path)
    assert kernels.op_types.get("QLinearConv") == 2 and kernels.float_gemms == 0


def test_below_8_bits_clips_to_2_pow_b_levels():
    ctx = context(graphs.linear_model(k=16, n=8, bias=False), {"x": (2, 4, 16)}, abits=4)
    _compile(ctx)
    model = ctx.model()
    assert "Clip" in [n.op_type for n in model.graph.node]
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "x/" in n.name)
    probe = onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)
    model.graph.output.append(probe)
    x = np.random.default_rng(1).standard_normal((2, 4, 16)).astype(np.float32) * 10  # far outside range
    from qcompiler.runtimes.ort import make_session

    values = make_session(model).run([dq.output[0]], {"x": x})[0]
    assert len(np.unique(values)) <= 2**4


def test_graph_without_quantized_gemm_is_unchanged():
    ctx = context(graphs.layernorm_model(), {"x": (2, 4, 8)})
    assert not InsertActivationQDQ().call(ctx).modified


def test_gemm_bias_becomes_int32_and_gemm_fuses_to_qgemm(tmp_path):
    model = graphs.gemm_model()
    ctx = context(model, {"x": (4, 16)})
    _compile(ctx)
    quantized = ctx.model()
    bias_dq = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and "b/" in n.name]
    assert len(bias_dq) == 1
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    kernels = count_kernels(path)
    assert kernels.op_types.get("QGemm") == 1 and kernels.float_gemms == 0
    # Bias rounding adds at most s_x·s_w/2 per output: negligible next to activation rounding.
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    from qcompiler.quant import sqnr_db
    assert sqnr_db(run_model(model, {"x": x}), run_model(quantized, {"x": x})) > 30


def test_below_8_bits_conv_outputs_keep_fusion_and_output_names(tmp_path):
    model = graphs.conv_model()
    ctx = context(model, {"x": (1, 4, 8, 8)}, abits=6)
    _compile(ctx)
    quantized = ctx.model()
    assert [o.name for o in quantized.graph.output] == ["y"]
    path = tmp_path / "q.onnx"
    onnx.save(quantized, path)
    assert count_kernels(path).op_types.get("QLinearConv") == 2
    # GEMM inputs are narrowed to 6 bits; Conv outputs keep the kernel's 8 bits (no GEMM reads them
    # unquantized, and a coarser output grid would only add error).
    clip = next(n for n in quantized.graph.node if n.op_type == "Clip").output[0]
    q = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == clip).output[0]
    probe = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q).output[0]
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32) * 10
    values = make_session(add_outputs(quantized, [probe])).run([probe, "y"], {"x": x})
    assert len(np.unique(values[0])) <= 2**6 < len(np.unique(values[1])) <= 2**8


def test_conv_output_read_by_a_conv_and_a_residual_add_still_fuses(tmp_path):
    """The output's grid and the next Conv's input grid are one QDQ; the Add reads its DQ too."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["g"], name="conv2"),
             helper.make_node("Add", ["h", "g"], ["y"], name="residual")]
    model = graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 8, 8])],
                              [graphs.init("w1", rng.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                               graphs.init("w2", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))])
    ctx = context(model, {"x": (1, 4, 8, 8)})
    _compile(ctx)
    path = tmp_path / "q.onnx"
    onnx.save(ctx.model(), path)
    assert count_kernels(path).op_types.get("QLinearConv") == 2
