"""Graph I/O: external data both ways, atomic writes, readable names, metadata."""

import numpy as np
import onnx
import pytest

from qcompiler import graph as graph_module
from qcompiler.errors import QCompileError
from qcompiler.graph import NameScope, load_model, save_model, set_metadata, to_graph
from tests import graphs


def test_external_data_round_trip_keeps_caller_model(tmp_path):
    model = graphs.linear_model()
    before = model.SerializeToString()
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    assert model.SerializeToString() == before, "saving must not strip the caller's weights"
    loaded = load_model(path)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in loaded.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, value in original.items():
        np.testing.assert_array_equal(weights[name], value)


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    # The real threshold is ~1.8 GiB (protobuf's 2 GiB limit); lower it so the rule is tested quickly.
    monkeypatch.setattr(graph_module, "EXTERNAL_DATA_THRESHOLD", 100)
    save_model(graphs.linear_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()


def test_truncated_external_data_is_named(tmp_path):
    path = save_model(graphs.linear_model(), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(QCompileError, match="shorter than initializer"):
        load_model(path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", explode)
    with pytest.raises(QCompileError, match="No space left"):
        save_model(graphs.linear_model(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_names_are_readable_and_unique():
    scope = NameScope(to_graph(graphs.linear_model()))
    first = scope.make("x", "insert_activation_qdq", "QuantizeLinear")
    second = scope.make("x", "insert_activation_qdq", "QuantizeLinear")
    assert first == "x/insert_activation_qdq/QuantizeLinear" and second != first


def test_metadata_set_and_replaced():
    model = graphs.linear_model()
    set_metadata(model, {"qcompile.recipe": "minmax"})
    set_metadata(model, {"qcompile.recipe": "dgq", "qcompile.version": "0"})
    assert {p.key: p.value for p in model.metadata_props} == {"qcompile.recipe": "dgq", "qcompile.version": "0"}
