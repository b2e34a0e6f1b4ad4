"""Ranges reduced inside ORT equal the numpy statistics bit for bit, in one ORT run per batch."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import CalibrationBatch, StatsConfig, collect_statistics
from qcompiler.calibration import capture as capture_module
from tests.calibration.test_statistics import build, conv_model, exact_values, make_batches, matmul_model

FULL = StatsConfig(progress=False)
RANGES = StatsConfig(progress=False, ranges_only=True)
RANGE_FIELDS = ("channel_min", "channel_max", "index_min", "index_max")


def assert_same_ranges(got, expected) -> None:
    for field in RANGE_FIELDS:
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field), err_msg=field)
    assert (got.min, got.max, got.absmax, got.samples, got.channel_axis) == \
        (expected.min, expected.max, expected.absmax, expected.samples, expected.channel_axis)


@pytest.mark.parametrize("seed", range(3))
def test_ranges_equal_numpy_statistics(seed):
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    batches = make_batches(rng, [2, 3, 1], (2, 5, 5))
    for axis in (1, 2, -1):  # channels, rows, columns of an NCHW activation
        expected = collect_statistics(conv_model(conv_w), batches, {"c": axis, "y": axis}, FULL)
        got = collect_statistics(conv_model(conv_w), batches, {"c": axis, "y": axis}, RANGES)
        for name in ("c", "y"):
            assert_same_ranges(got[name], expected[name])
            assert got[name].hist_counts.size == 0  # ranges only: no histogram was computed
            # Channel means (bias correction) agree to float32 summation in ORT.
            np.testing.assert_allclose(got[name].channel_mean, expected[name].channel_mean, rtol=1e-5, atol=1e-6)
            assert got[name].channel_rows == expected[name].channel_rows
    mm_w = exact_values(rng, (3, 6), 0.5)
    token_batches = make_batches(rng, [2, 2], (4, 3))
    expected = collect_statistics(matmul_model(mm_w), token_batches, {"h": None, "x": None}, FULL)
    got = collect_statistics(matmul_model(mm_w), token_batches, {"h": None, "x": None}, RANGES)
    for name in ("h", "x"):  # x is a graph input: read from the feeds by the full path
        assert_same_ranges(got[name], expected[name])


def test_one_ort_run_per_batch(monkeypatch):
    rng = np.random.default_rng(3)
    model = conv_model(rng.standard_normal((3, 2, 3, 3)).astype(np.float32))
    batches = make_batches(rng, [1, 1, 1, 1], (2, 5, 5))
    runs = []
    original = capture_module.run_batch
    monkeypatch.setattr("qcompiler.calibration.reductions.run_batch", lambda *a: runs.append(1) or original(*a))
    collect_statistics(model, batches, {"c": 1, "y": 1}, RANGES)
    assert len(runs) == len(batches)


def test_non_finite_activation_falls_back_to_full_capture():
    # y = Log(x): x = 0 gives -inf, which the full path counts and leaves out of every range.
    model = build([helper.make_node("Log", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 3])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 4, 3])], [])
    x = np.abs(np.random.default_rng(4).standard_normal((2, 4, 3))).astype(np.float32) + 0.1
    x[0, 1, 2] = 0.0
    batches = [CalibrationBatch({"x": x}, {}, "0.npz")]
    got = collect_statistics(model, batches, {"y": None}, RANGES)["y"]
    expected = collect_statistics(model, batches, {"y": None}, FULL)["y"]
    assert got.nonfinite == expected.nonfinite == 1
    assert_same_ranges(got, expected)


def test_opset_18_reductions_take_axes_as_input():
    rng = np.random.default_rng(5)
    weight = exact_values(rng, (3, 5), 0.5)
    model = matmul_model(weight)
    model.opset_import[0].version = 18
    batches = make_batches(rng, [2], (4, 3))
    assert_same_ranges(collect_statistics(model, batches, {"h": None}, RANGES)["h"],
                       collect_statistics(model, batches, {"h": None}, FULL)["h"])


def test_each_reduction_runs_right_after_its_tensor(monkeypatch, tmp_path):
    # ORT's default order ran every reduction after the whole forward pass, so each captured
    # activation stayed alive to the end (1.28 GiB on PixArt-α); lean sessions keep file order.
    import json

    import onnxruntime as ort

    from qcompiler.calibration.capture import OutputRunner, as_skeleton
    from qcompiler.calibration.reductions import reduction_model
    from qcompiler.runtimes.ort import make_session

    nodes, weights, source = [], [], "x"
    for index in range(4):
        weights.append(np.eye(3, dtype=np.float32))
        nodes += [helper.make_node("MatMul", [source, f"w{index}"], [f"m{index}"], name=f"mm{index}"),
                  helper.make_node("Relu", [f"m{index}"], [f"r{index}"], name=f"relu{index}")]
        source = f"r{index}"
    model = build(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 3])],
                  [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["B", 4, 3])],
                  [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    skel = as_skeleton(model)
    reduced, outputs = reduction_model(skel, OutputRunner(skel), {f"m{i}": (3, 2) for i in range(4)})

    class Profiled(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling, self.profile_file_prefix = True, str(tmp_path / "profile")

    monkeypatch.setattr(ort, "SessionOptions", Profiled)
    session = make_session(reduced, lean=True)
    session.run([out for names in outputs.values() for out in names.values()],
                {"x": np.ones((2, 4, 3), np.float32)})
    events = json.loads(open(session.end_profiling()).read())
    order = [event["args"]["op_name"] for event in events
             if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
    assert order == ["MatMul", "ReduceMin", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceMax", "Relu"] * 4
