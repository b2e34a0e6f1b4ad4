"""Constant sharing: duplicate small constants collapse to one copy; outputs stay bit-identical."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompiler.graph import to_model
from qcompiler.lowering.constant_sharing import MAX_SHARED_BYTES, share_constants


def _qdq_chain(scale_a, scale_b, big=False):
    """x → Q/DQ(scale_a) → Mul(w) → Q/DQ(scale_b) → y, with the zero points as separate copies."""
    x = gs.Variable("x", np.float32, (4, 8))
    tensors = [x]
    nodes = []
    rows = MAX_SHARED_BYTES // 4 + 1 if big else 1
    weight_values = np.full((rows, 8), 0.5, np.float32)
    for i, scale in enumerate((scale_a, scale_b)):
        s = gs.Constant(f"s{i}", np.array(scale, np.float32))
        z = gs.Constant(f"z{i}", np.array(0, np.uint8))
        q = gs.Variable(f"q{i}", np.uint8)
        d = gs.Variable(f"d{i}", np.float32)
        nodes += [gs.Node("QuantizeLinear", inputs=[tensors[-1], s, z], outputs=[q]),
                  gs.Node("DequantizeLinear", inputs=[q, s, z], outputs=[d])]
        w = gs.Constant(f"w{i}", weight_values.copy())
        m = gs.Variable(f"m{i}", np.float32)
        reduced = gs.Variable(f"r{i}", np.float32)
        nodes += [gs.Node("ReduceMean", inputs=[w], outputs=[reduced], attrs={"axes": [0], "keepdims": 1}),
                  gs.Node("Mul", inputs=[d, reduced], outputs=[m])]
        tensors.append(m)
    y = tensors[-1]
    y.dtype, y.shape = np.float32, (4, 8)
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=13)
    return graph


def _run(graph, feed):
    model = to_model(graph.copy())
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0], model


def test_equal_constants_share_one_copy_and_outputs_are_identical():
    graph = _qdq_chain(0.05, 0.05)
    feed = {"x": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    before, model_before = _run(graph, feed)
    assert share_constants(graph) == 3  # s1, z1 and w1 duplicate s0, z0 and w0
    graph.cleanup()
    after, model_after = _run(graph, feed)
    np.testing.assert_array_equal(before, after)
    assert len(model_before.graph.initializer) == 6
    assert sorted(t.name for t in model_after.graph.initializer) == ["s0", "w0", "z0"]


def test_different_values_and_large_constants_are_not_shared():
    graph = _qdq_chain(0.05, 0.07, big=True)
    assert share_constants(graph) == 1  # only the zero points: the scales differ, the weights are too large
    names = {t.name for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant)}
    assert names == {"s0", "s1", "z0", "w0", "w1"}


def test_dtype_distinguishes_equal_bytes():
    graph = _qdq_chain(0.05, 0.05)
    zero_point = next(t for node in graph.nodes for t in node.inputs if t.name == "z1")
    zero_point.values = np.array(0, np.int8)  # same byte, other type: a different zero point
    for node in graph.nodes:  # the Q/DQ pair must agree on the type
        if node.outputs[0].name == "q1":
            node.outputs[0].dtype = np.int8
    assert share_constants(graph) == 2  # s1 and w1 only
