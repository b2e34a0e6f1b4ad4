"""The ORT target's input check: ops without an ORT kernel are named; Constant and function ops pass."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import QCompileError
from qcompiler.targets.ort import OrtTarget
from tests import graphs


def _model(extra_node, opsets=(("", 17),)):
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value=graphs.init("v", np.ones(4, np.float32))),
             helper.make_node("Add", ["x", "c"], ["h"], name="add"), extra_node]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)


def test_constant_and_function_ops_are_accepted():
    # Celu is an ONNX function op: ORT expands it rather than registering a kernel.
    OrtTarget().check_model(_model(helper.make_node("Celu", ["h"], ["y"], name="celu")), "m.onnx")


def test_an_op_without_kernel_is_named():
    model = _model(helper.make_node("Warp", ["h"], ["y"], name="warp", domain="com.example"),
                   (("", 17), ("com.example", 1)))
    with pytest.raises(QCompileError, match=r"m.onnx: node 'warp' is com.example:Warp, an op ONNX Runtime"):
        OrtTarget().check_model(model, "m.onnx")
