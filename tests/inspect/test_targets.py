"""Which tensors inspect watches: residual sums vs bias, mask and constant Adds; channel axes; labels."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qcompiler.graph import to_graph
from qcompiler.inspect.targets import find_targets
from tests import graphs
from tests.graphs import init, make_model


def adds_model():
    """x → Linear(W, b) → lin;  res = lin + x (residual);  scores = x·xᵀ + mask → Softmax;  res + Constant."""
    c, t = 4, 3
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="/block/fc/MatMul"),
             helper.make_node("Add", ["mm", "b"], ["lin"], name="/block/fc/Add"),
             helper.make_node("Add", ["lin", "x"], ["res"], name="/block/residual/Add"),
             helper.make_node("Transpose", ["x"], ["xt"], name="/block/t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["scores"], name="/block/scores"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="/block/mask/Add"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="/block/softmax", axis=-1),
             helper.make_node("Constant", [], ["one"], name="/block/one",
                              value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])),
             helper.make_node("Add", ["res", "one"], ["y"], name="/block/plus_one/Add")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", t, c]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 1, t])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", t, c]),
               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", t, t])]
    return make_model(nodes, inputs, outputs, [init("W", np.eye(c, dtype=np.float32)),
                                               init("b", np.zeros(c, np.float32))])


def test_only_the_activation_sum_is_a_residual_sum():
    targets = find_targets(to_graph(adds_model()))
    roles = {a.tensor: a.roles for a in targets.activations}
    # lin: bias (constant input); masked: feeds a Softmax and broadcasts; y: a Constant-node input.
    assert roles == {"x": ("gemm_input",), "res": ("residual_sum",)}
    assert [a.channel_axis for a in targets.activations] == [-1, -1]


def test_labels_drop_the_shared_prefix():
    targets = find_targets(to_graph(adds_model()))
    assert [a.label for a in targets.activations] == ["x", "residual/Add"]
    assert [layer.label for layer in targets.layers] == ["fc/MatMul"]


def test_conv_tensors_use_channel_axis_one_and_weights_are_out_in_taps():
    targets = find_targets(to_graph(graphs.conv_model(c_in=4, c_out=8)))
    assert [(a.tensor, a.channel_axis) for a in targets.activations] == [("x", 1), ("r1", 1)]
    assert [layer.weight.shape for layer in targets.layers] == [(8, 4, 9), (8, 8, 1)]


def test_layernorm_output_and_linear_weight_orientation():
    targets = find_targets(to_graph(graphs.layernorm_model(c=8)))
    assert [(a.tensor, a.roles, a.channel_axis) for a in targets.activations] == [("y", ("norm_output",), -1)]
    linear = find_targets(to_graph(graphs.linear_model(k=16, n=8))).layers[0]
    assert linear.weight.shape == (8, 16, 1)  # MatMul [K, N] viewed as [out, in, taps]
