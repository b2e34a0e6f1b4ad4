"""Skeleton export details: nodes that read only weights are placed just before their first reader."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.graph import to_graph, to_skeleton
from qcompiler.runtimes.ort import make_session
from qcompiler.skeleton import constants_late
from tests import graphs


def dq_chain(layers=3, width=8):
    """x → (DQ(W_i) → MatMul)×layers, with every DequantizeLinear listed first (as a toposort by level gives)."""
    rng = np.random.default_rng(0)
    dqs, matmuls, inits, current = [], [], [], "x"
    for i in range(layers):
        inits += [graphs.init(f"q{i}", rng.integers(-127, 128, (width, width)).astype(np.int8)),
                  graphs.init(f"s{i}", np.float32(0.01))]
        dqs.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], name=f"dq{i}"))
        matmuls.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        current = f"h{i}"
    return graphs.make_model(dqs + matmuls, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
                             [helper.make_tensor_value_info(current, TensorProto.FLOAT, [2, width])], inits)


def test_each_dequantize_moves_next_to_its_reader_and_outputs_are_unchanged():
    model = dq_chain()
    reordered = onnx.ModelProto()
    reordered.CopyFrom(model)
    constants_late(reordered.graph)
    assert [n.name for n in reordered.graph.node] == ["dq0", "mm0", "dq1", "mm1", "dq2", "mm2"]
    onnx.checker.check_model(reordered)
    x = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    expected = make_session(model, optimize=False).run(None, x)[0]
    np.testing.assert_array_equal(make_session(reordered, optimize=False).run(None, x)[0], expected)


def test_skeleton_export_applies_it():
    proto = to_skeleton(to_graph(dq_chain())).proto
    names = [n.name for n in proto.graph.node]
    assert names.index("dq2") == names.index("mm2") - 1


def test_a_weight_only_node_that_is_a_graph_output_stays():
    model = dq_chain(layers=1)
    model.graph.output.append(helper.make_tensor_value_info("w0", TensorProto.FLOAT, [8, 8]))
    constants_late(model.graph)
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["dq0", "mm0"]


def test_capture_nodes_go_right_after_their_producers():
    """insert_after_producers: each added node follows the last producer of its inputs (chains
    of added nodes too), the order stays topological, and the model still runs the same."""
    from onnx import helper

    from qcompiler.skeleton import insert_after_producers

    model = graphs.conv_model()
    graph = model.graph
    before = [node.name for node in graph.node]
    added = [helper.make_node("Cast", ["c1"], ["c1_f"], name="cast_c1", to=onnx.TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["c1_f"], ["c1_max"], name="max_c1", keepdims=0),
             helper.make_node("ReduceMin", ["r1"], ["r1_min"], name="min_r1", keepdims=0),
             helper.make_node("ReduceMin", ["x"], ["x_min"], name="min_x", keepdims=0)]
    insert_after_producers(graph, added)
    order = [node.name for node in graph.node]
    assert order == ["min_x", before[0], "cast_c1", "max_c1", before[1], "min_r1", *before[2:]]
    graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [])
                        for n in ("c1_max", "r1_min", "x_min"))
    onnx.checker.check_model(model)  # topologically sorted
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    outputs = dict(zip([o.name for o in graph.output],
                       make_session(model, optimize=False).run(None, {"x": x})))
    np.testing.assert_array_equal(outputs["x_min"], x.min())


def test_open_skeleton_gives_back_the_saved_graph_and_weights(tmp_path):
    # What a calibration worker opens (calibration/distributed.py): the proto as written (value infos
    # included), the weights memory-mapped from the .data file, and a session with the same outputs.
    from qcompiler.skeleton import open_skeleton, save_skeleton

    skel = to_skeleton(to_graph(dq_chain(width=32)))  # 32×32 int8 weights: above INLINE_BYTES, so external
    path = save_skeleton(skel, tmp_path / "m.onnx", external_data=True)
    opened = open_skeleton(path)
    assert set(opened.arrays) == set(skel.arrays) and opened.arrays
    for name, array in skel.arrays.items():
        assert isinstance(opened.arrays[name], np.memmap) and opened.arrays[name].tobytes() == array.tobytes()
    assert [n.SerializeToString() for n in opened.proto.graph.node] == \
        [n.SerializeToString() for n in skel.proto.graph.node]
    assert opened.proto.graph.value_info == skel.proto.graph.value_info
    x = {"x": np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)}
    np.testing.assert_array_equal(make_session(opened, lean=True).run(None, x)[0],
                                  make_session(skel, lean=True).run(None, x)[0])
