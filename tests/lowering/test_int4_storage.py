"""Int4 weights stored packed (ONNX INT4 + Cast): the file shrinks, ORT's kernels and outputs do not change."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from qcompiler.graph import to_model
from qcompiler.lowering.int4_storage import pack_int4_weights


def _qdq_conv(weight_codes: np.ndarray, opset: int = 18, reduce_mean: bool = False) -> gs.Graph:
    """x → Q/DQ → Conv(DQ(W_q int8, s)) → Q/DQ → y: the form ORT fuses into QLinearConv."""
    x, y = gs.Variable("x", np.float32, (1, 4, 8, 8)), gs.Variable("y", np.float32, (1, 8, 8, 8))
    scale, zero = gs.Constant("xs", np.array(0.05, np.float32)), gs.Constant("xz", np.array(0, np.uint8))
    out_scale, out_zero = gs.Constant("ys", np.array(0.1, np.float32)), gs.Constant("yz", np.array(128, np.uint8))
    weight_scale = gs.Constant("ws", np.linspace(0.01, 0.02, 8).astype(np.float32))
    tensors = {name: gs.Variable(name, dtype) for name, dtype in
               (("xq", np.uint8), ("xd", np.float32), ("wd", np.float32), ("c", np.float32), ("cq", np.uint8))}
    nodes = [gs.Node("QuantizeLinear", inputs=[x, scale, zero], outputs=[tensors["xq"]]),
             gs.Node("DequantizeLinear", inputs=[tensors["xq"], scale, zero], outputs=[tensors["xd"]]),
             gs.Node("DequantizeLinear", name="w_dq", attrs={"axis": 0},
                     inputs=[gs.Constant("w_q", weight_codes), weight_scale,
                             gs.Constant("wz", np.zeros(8, np.int8))], outputs=[tensors["wd"]]),
             gs.Node("Conv", inputs=[tensors["xd"], tensors["wd"]], outputs=[tensors["c"]], attrs={"pads": [1, 1, 1, 1]}),
             gs.Node("QuantizeLinear", inputs=[tensors["c"], out_scale, out_zero], outputs=[tensors["cq"]]),
             gs.Node("DequantizeLinear", inputs=[tensors["cq"], out_scale, out_zero], outputs=[y])]
    if reduce_mean:  # an op whose meaning changes at opset 18 (axes from an attribute to an input)
        mean = gs.Variable("mean", np.float32)
        nodes.append(gs.Node("ReduceMean", inputs=[y], outputs=[mean], attrs={"axes": [1], "keepdims": 1}))
        outputs = [y, mean]
    else:
        outputs = [y]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=opset)
    return graph


def _codes(low: int = -8, high: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, (8, 4, 3, 3)).astype(np.int8)


def _run(model: onnx.ModelProto, tmp_path, name: str):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 4, 8, 8)).astype(np.float32)
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    return session.run(None, {"x": x}), ops


def test_int4_codes_are_stored_packed_and_run_bit_identically_on_qlinearconv(tmp_path):
    codes = _codes()
    reference = to_model(_qdq_conv(codes))
    graph = _qdq_conv(codes)
    packed, saved, notes = pack_int4_weights(graph, min_elements=1)
    assert (packed, saved) == (1, codes.size // 2) and notes == ["opset 18 → 21"]  # no op converted
    model = to_model(graph)
    stored = {t.name: t for t in model.graph.initializer}
    assert stored["w_q/int4"].data_type == onnx.TensorProto.INT4 and len(stored["w_q/int4"].raw_data) == codes.size // 2
    assert "w_q" not in stored and model.opset_import[0].version == 21
    (expected,), reference_ops = _run(reference, tmp_path, "reference")
    (actual,), ops = _run(model, tmp_path, "packed")
    np.testing.assert_array_equal(actual, expected)
    assert "QLinearConv" in ops and ops == reference_ops  # the Cast of a constant is folded before the fusion
    tensor_bytes = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
    assert tensor_bytes(reference) - tensor_bytes(model) == codes.size - codes.size // 2


def test_codes_outside_the_int4_range_stay_int8():
    graph = _qdq_conv(_codes(-20, 20))
    assert pack_int4_weights(graph, min_elements=1) == (0, 0, [])
    assert graph.opset == 18 and not any(node.op == "Cast" for node in graph.nodes)


def test_an_opset_raise_that_would_change_an_op_keeps_the_containers():
    graph = _qdq_conv(_codes(), opset=17, reduce_mean=True)
    packed, saved, notes = pack_int4_weights(graph, min_elements=1)
    assert (packed, saved) == (0, 0) and graph.opset == 17
    assert len(notes) == 1 and "ReduceMean" in notes[0] and "int8 containers" in notes[0]


@pytest.mark.parametrize("storage", ["packed", "container"])
def test_w4_compile_stores_conv_weights_as_asked(storage):
    import qcompiler
    from qcompiler.api import CompileOptions
    from tests import graphs
    from tests.passes.helpers import batches_for

    model = graphs.conv_model(c_in=8, c_out=16)
    result = qcompiler.quantize(model, "minmax", batches_for(model, {"x": (2, 8, 8, 8)}),
                                options=CompileOptions(wbits=4, abits=8, progress=False, int4_storage=storage))
    types = {t.data_type for t in result.model.graph.initializer}
    assert (onnx.TensorProto.INT4 in types) == (storage == "packed")
    assert result.report["integer_kernels"]["integer_gemms"] == result.report["quantized_gemms"] == 2
