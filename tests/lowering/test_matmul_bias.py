"""The ORT target keeps DQ → MatMul → Add(b) on an integer kernel when shapes are static.

Match: a static 3-D activation (ORT's MatMulAddFusion would make Reshape → Gemm → Reshape in float)
and a 2-D one (MatMul + Add → Gemm → QGemm). No-match: a MatMul whose Add is a residual (reads another activation).
The rewrite is exact: the lowered model's outputs equal those of the same QDQ graph before it
(1e-5 relative, bias broadcasting is the same sum; QGemm's int32 bias rounds within s_x·s_w/2).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler import api
from qcompiler.api import CompileOptions
from qcompiler.runtimes.ort import count_kernels, make_session
from tests import graphs


def linear(shape, k=32, n=48, residual=False, seed=0):
    """x[shape + (k,)] → MatMul(W[k, n]) → Add(b) → y, all dims static."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*shape, k])]
    inits = [graphs.init("W", rng.standard_normal((k, n)).astype(np.float32) * 0.2)]
    if residual:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [*shape, n]))
    else:
        inits.append(graphs.init("b", rng.standard_normal(n).astype(np.float32)))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b"], ["y"], name="fc_bias")]
    return graphs.make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape, n])],
                             inits)


def calibration(model, count=4, seed=1):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            feed[value.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def compile_minmax(model, tmp_path, recipe="minmax"):
    out = tmp_path / "q.onnx"
    api.quantize(model, recipe, calibration(model), output=out, options=CompileOptions())
    return out


# dgq lowers rank ≤ 3 channel groups as one integer GEMM (a rank-4 token tensor stays simulated).
@pytest.mark.parametrize("shape, fused, recipe", [((16,), "QGemm", "minmax"), ((2, 8), "MatMulIntegerToFloat", "minmax"),
                                                  ((2, 4, 8), "MatMulIntegerToFloat", "minmax"),
                                                  ((16,), "QGemm", "dgq"), ((2, 8), "MatMulIntegerToFloat", "dgq")])
def test_static_matmul_add_runs_on_an_integer_kernel(tmp_path, shape, fused, recipe):
    model = linear(shape)
    out = compile_minmax(model, tmp_path, recipe)
    kernels = count_kernels(out)
    assert kernels.integer_gemms == 1 and kernels.float_gemms == 0, kernels.op_types
    assert kernels.op_types.get(fused) == 1
    if recipe != "minmax":
        return  # DGQ's accuracy on 4 random calibration samples is not this test's subject
    feed = calibration(model, count=1, seed=7)[0]
    float_y = make_session(model).run(None, feed)[0]
    quant_y = make_session(str(out)).run(None, feed)[0]
    # W8A8 on a 32-term dot product: the error is a small share of the output's spread.
    assert np.abs(quant_y - float_y).max() < 0.05 * np.abs(float_y).max()


def test_rewrite_is_exact_against_the_unlowered_qdq_graph(tmp_path):
    """Same QDQ graph with ORT's optimizations off on both sides: the rank-3 bias changes nothing."""
    model = linear((2, 8))
    out = compile_minmax(model, tmp_path)
    lowered = onnx.load(out)
    bias = next(i for i in lowered.graph.initializer if i.dims and i.dims[-1] == 48 and len(i.dims) == 3)
    assert list(bias.dims) == [1, 1, 48]
    flat = onnx.load(out)
    flat_bias = next(i for i in flat.graph.initializer if i.name == bias.name)
    flat_bias.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(bias).reshape(48), bias.name))
    feed = calibration(model, count=1, seed=3)[0]
    got = make_session(lowered, optimize=False).run(None, feed)[0]
    expected = make_session(flat, optimize=False).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_dynamic_batch_stays_integer(tmp_path):
    """A symbolic batch dim: the rank-r bias is still exact and the MatMul still integer."""
    model = linear((2, 8))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "B"
    out = compile_minmax(model, tmp_path)
    assert count_kernels(out).integer_gemms == 1


def test_residual_add_is_left_alone(tmp_path):
    model = linear((2, 8), residual=True)
    out = compile_minmax(model, tmp_path)
    lowered = onnx.load(out)
    add = next(n for n in lowered.graph.node if n.op_type == "Add")
    assert "b" in add.input
    assert not any(n.op_type == "Gemm" for n in lowered.graph.node)
