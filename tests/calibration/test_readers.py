"""Tests for the calibration readers: the .npz folder format, ORT-style readers, and validation errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import (
    CalibrationBatch,
    CallableReader,
    NpzFolderReader,
    as_reader,
    load_calibration,
)
from qcompiler.errors import QCompileError


def reader_model() -> onnx.ModelProto:
    """x float32 (B, 4, 3) + b (an input with an initializer default) -> y; t int64 (B,) -> t_out."""
    nodes = [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Identity", ["t"], ["t_out"])]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 3]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 3]),
               helper.make_tensor_value_info("t_out", TensorProto.INT64, ["B"])]
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    model = helper.make_model(helper.make_graph(nodes, "readers", inputs, outputs, [bias]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4, 3)).astype(np.float32),
            "t": np.arange(batch, dtype=np.int64), "__timestep__": np.arange(batch) * 10.0}


def write(folder, name: str, **arrays) -> None:
    folder.mkdir(exist_ok=True)
    np.savez(folder / name, **arrays)


@pytest.fixture
def calib(tmp_path):
    """Two files written out of order, batch sizes 3 and 2."""
    folder = tmp_path / "calib"
    write(folder, "b.npz", **feeds(2, seed=2))
    write(folder, "a.npz", **feeds(3, seed=1))
    return folder


def test_folder_reader_sorted_split_and_restartable(calib):
    reader = NpzFolderReader(calib)
    batches = list(reader)
    assert [b.source for b in batches] == ["a.npz", "b.npz"]
    assert [b.batch_size for b in batches] == [3, 2]
    assert set(batches[0].feeds) == {"x", "t"} and set(batches[0].metadata) == {"__timestep__"}
    np.testing.assert_array_equal(batches[0].feeds["x"], feeds(3, seed=1)["x"])
    assert [b.source for b in reader] == ["a.npz", "b.npz"]  # a second iteration starts over


def test_folder_reader_is_ort_compatible(calib):
    reader = NpzFolderReader(calib)
    first, second, end = reader.get_next(), reader.get_next(), reader.get_next()
    assert end is None and set(first) == {"x", "t"}  # metadata is never fed to the model
    assert first["x"].shape == (3, 4, 3) and second["x"].shape == (2, 4, 3)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], first["x"])


def test_load_calibration_limit_cuts_last_batch(calib):
    batches = load_calibration(calib, reader_model(), limit=4)
    assert [b.batch_size for b in batches] == [3, 1]
    assert batches[1].metadata["__timestep__"].shape == (1,)  # metadata with the batch axis is cut too


def test_symbolic_batch_dim_accepts_any_size(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **feeds(7))
    assert load_calibration(folder, reader_model())[0].batch_size == 7


def test_ort_style_reader_object():
    class Reader:  # the duck type of onnxruntime.quantization.CalibrationDataReader
        def __init__(self):
            self.items = [feeds(2, seed=s) for s in range(3)]

        def get_next(self):
            return self.items.pop(0) if self.items else None

    batches = load_calibration(Reader(), reader_model())
    assert len(batches) == 3 and batches[2].source == "Reader[2]"
    assert "__timestep__" in batches[0].metadata


def test_onnxruntime_calibration_data_reader_subclass():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{k: v for k, v in feeds(2).items() if not k.startswith("__")}])

        def get_next(self):
            return next(self.data, None)

    assert [b.batch_size for b in load_calibration(Reader(), reader_model())] == [2]


def test_callable_iterable_and_single_dict_sources():
    model = reader_model()
    reader = CallableReader(lambda: (feeds(1, seed=s) for s in range(2)))
    assert len(load_calibration(reader, model)) == 2
    assert len(list(reader)) == 2  # the callable is called again: iteration restarts
    assert len(load_calibration([feeds(2), feeds(2)], model)) == 2
    assert len(load_calibration(feeds(2), model)) == 1
    assert isinstance(as_reader(reader), CallableReader)


def expect_error(source, *fragments: str) -> str:
    with pytest.raises(QCompileError) as info:
        load_calibration(source, reader_model())
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "nope", "nope", "not found")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    expect_error(tmp_path / "empty", "empty", "no .npz files")


@pytest.mark.parametrize("content", [b"this is not a zip file", b"PK\x03\x04truncated"])
def test_corrupt_file(tmp_path, content):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **feeds(2))
    (folder / "1.npz").write_bytes(content)
    expect_error(folder, "1.npz", "not a readable .npz")


def test_object_array_is_refused(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **feeds(2), __label__=np.array([{"prompt": "a cat"}], dtype=object))
    expect_error(folder, "0.npz", "object arrays")


def test_missing_input(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", x=feeds(2)["x"])
    expect_error(folder, "0.npz", "missing model input 't'")


def test_unknown_key(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **feeds(2), mask=np.ones((2, 4)))
    expect_error(folder, "0.npz", "'mask'", "x, t", "'__'")


def test_wrong_dtype(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **{**feeds(2), "t": np.zeros(2, np.int32)})
    expect_error(folder, "0.npz", "'t'", "int32", "int64")


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 3, 1), (2, 12)])
def test_wrong_shape(tmp_path, shape):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **{**feeds(2), "x": np.zeros(shape, np.float32)})
    expect_error(folder, "0.npz", "'x'", str(shape), "(?, 4, 3)")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    folder = tmp_path / "calib"
    x = feeds(2)["x"]
    x[0, 1, :] = bad  # 3 values
    write(folder, "0.npz", **{**feeds(2), "x": x})
    expect_error(folder, "0.npz", "'x'", "3 non-finite")


def test_inconsistent_batch_size(tmp_path):
    folder = tmp_path / "calib"
    write(folder, "0.npz", **{**feeds(2), "t": np.zeros(3, np.int64)})
    expect_error(folder, "0.npz", "x: 2", "t: 3")


def test_limit_must_be_positive(calib):
    with pytest.raises(QCompileError, match="positive"):
        load_calibration(calib, reader_model(), limit=0)


def test_batch_is_frozen():
    batch = CalibrationBatch(feeds={}, metadata={}, source="s")
    with pytest.raises(AttributeError):
        batch.source = "other"
    assert batch.batch_size == 1  # no feed with a batch axis
