"""qcompiler.downstream: per-output-channel weights from the next Linear/Conv layers' input-channel energy."""

import numpy as np
from onnx import TensorProto, helper

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.downstream import output_channel_weights
from qcompiler.patterns import match_conv, match_linear
from tests import fold_graphs
from tests.graphs import init, make_model


def _graph(model):
    return CompileContext(model, QuantSettings(), []).graph


def _node(graph, name):
    return next(node for node in graph.nodes if node.name == name)


def _chain(scale: np.ndarray, w1: np.ndarray, w2: np.ndarray, tail: str = "MatMul"):
    """x → MatMul(W1) → Mul(scale) → ``tail`` → y."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "a"], ["ha"], name="scale")]
    if tail == "MatMul":
        nodes.append(helper.make_node("MatMul", ["ha", "W2"], ["y"], name="fc2"))
    else:  # Softmax: a path that does not end in a Linear/Conv
        nodes.append(helper.make_node("Softmax", ["ha"], ["y"], name="fc2", axis=-1))
    inits = [init("W1", w1), init("a", scale), init("W2", w2)]
    value = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", 4, c])
    return make_model(nodes, [value("x", w1.shape[0])], [value("y", w2.shape[1])], inits)


def test_weights_are_the_next_layer_row_energy_times_the_constant_factor_squared():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    scale = np.array([1, 2, 0.5, 1, 3, 1], np.float32)
    graph = _graph(_chain(scale, w1, w2))
    weights = output_channel_weights(graph, match_linear(_node(graph, "fc1")))
    expected = (w2.astype(np.float64) ** 2).sum(axis=1) * scale.astype(np.float64) ** 2
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-6)
    assert abs(weights.mean() - 1) < 1e-12


def test_unknown_when_a_path_ends_elsewhere():
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    graph = _graph(_chain(np.ones(6, np.float32), w1, w2, tail="Softmax"))
    assert output_channel_weights(graph, match_linear(_node(graph, "fc1"))) is None
    # the model output: the last layer has no downstream layer to weigh its channels
    graph = _graph(fold_graphs.linear_chain_model())
    assert output_channel_weights(graph, match_linear(_node(graph, "fc2"))) is None
    assert output_channel_weights(graph, match_linear(_node(graph, "fc1"))) is not None


def test_concat_offsets_pick_the_next_conv_input_channels():
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)     # conv1: 2 → 3 channels
    w2 = rng.standard_normal((4, 7, 3, 3)).astype(np.float32)     # conv2 reads concat(skip 4, conv1 3)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
             helper.make_node("Sigmoid", ["h"], ["s"], name="act"),
             helper.make_node("Concat", ["skip", "s"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    value = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", c, 5, 5])
    model = make_model(nodes, [value("x", 2), value("skip", 4)], [value("y", 4)], [init("w1", w1), init("w2", w2)])
    graph = _graph(model)
    weights = output_channel_weights(graph, match_conv(_node(graph, "conv1")))
    expected = (w2.astype(np.float64) ** 2).sum(axis=(0, 2, 3))[4:7]
    np.testing.assert_allclose(weights, expected / expected.mean(), rtol=1e-6)
