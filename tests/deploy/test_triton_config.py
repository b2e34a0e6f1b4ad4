"""qcompile deploy --triton: the repository layout, config.pbtxt read back through Triton's ModelConfig, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from qcompiler.cli.main import main
from qcompiler.deploy.triton import TritonOptions, build_config, model_config_schema, read_config
from qcompiler.models import BUNDLED_DEFAULT

#: Tokens in, per-token and per-request outputs: a dynamic inner axis, int64, a batch-only tensor.
TOKENS = """
<ir_version: 10, opset_import: ["" : 17]>
tokens (int64[batch, seq] ids, float[batch] scale) => (float[batch, seq] y, float[batch] total) {
    f = Cast <to = 1> (ids)
    s = Unsqueeze (scale, axes)
    y = Mul (f, s)
    total = ReduceSum <keepdims = 0> (y, axes)
}
"""
#: A static batch of 1: Triton must not batch it.
STATIC = """
<ir_version: 10, opset_import: ["" : 17]>
static (float[1, 4] x) => (float[1, 4] y) { y = Relu (x) }
"""


def _model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    if "axes" in text:  # Unsqueeze/ReduceSum take their axes as an input since opset 13
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"))
    onnx.checker.check_model(model)
    return model


def _save(tmp_path, text: str, name: str = "model.onnx"):
    path = tmp_path / name
    onnx.save(_model(text), path)
    return path


def _deploy(capsys, *argv):
    code = main(["deploy", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def _files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def _schema_name(data_type: int) -> str:
    return model_config_schema().DataType.Name(data_type)


def test_unet_repository_from_its_graph(tmp_path, capsys):
    code, out, err = _deploy(capsys, BUNDLED_DEFAULT, "--triton", tmp_path / "repo", "--name", "unet",
                             "--instances", "2", "--threads", "1")
    assert code == 0, err
    assert "wrote Triton model 'unet'" in out
    folder = tmp_path / "repo" / "unet"
    assert _files(folder) == ["1", "1/model.onnx", "config.pbtxt"]
    assert (folder / "1" / "model.onnx").read_bytes() == BUNDLED_DEFAULT.read_bytes()
    assert folder.stat().st_mode & 0o005 == (tmp_path / "repo").stat().st_mode & 0o005  # as readable as mkdir makes
    config = read_config(folder / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("unet", "onnxruntime_onnx", 8)
    inputs = {entry.name: entry for entry in config.input}
    # sample [batch, 1, 32, 32]; timestep [batch] (dims [1] reshaped to a scalar); text [batch, 10, 64]
    assert list(inputs["sample"].dims) == [1, 32, 32] and not inputs["sample"].HasField("reshape")
    assert list(inputs["timestep"].dims) == [1] and list(inputs["timestep"].reshape.shape) == []
    assert inputs["timestep"].HasField("reshape")
    assert list(inputs["encoder_hidden_states"].dims) == [10, 64]
    assert all(_schema_name(entry.data_type) == "TYPE_FP32" for entry in config.input)
    assert [(entry.name, list(entry.dims)) for entry in config.output] == [("noise_pred", [1, 32, 32])]
    assert config.HasField("dynamic_batching")
    group = config.instance_group[0]
    assert group.count == 2 and model_config_schema().ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
    assert config.optimization.graph.level == 0 and config.optimization.HasField("graph")  # ORT_ENABLE_ALL
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params == {"intra_op_thread_count": "1", "inter_op_thread_count": "1", "execution_mode": "0"}


def test_dynamic_inner_axis_int64_and_batch_only_tensors(tmp_path):
    model = _model(TOKENS)
    config = build_config(model, tmp_path / "tokens.onnx", TritonOptions(name="tokens", max_batch=4))
    entries = {entry.name: entry for entry in [*config.input, *config.output]}
    assert config.max_batch_size == 4
    assert list(entries["ids"].dims) == [-1] and _schema_name(entries["ids"].data_type) == "TYPE_INT64"
    assert list(entries["y"].dims) == [-1]
    for name in ("scale", "total"):
        assert list(entries[name].dims) == [1] and entries[name].HasField("reshape")


def test_max_batch_zero_keeps_every_axis(tmp_path):
    config = build_config(_model(TOKENS), tmp_path / "tokens.onnx", TritonOptions(name="tokens", max_batch=0))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert {entry.name: list(entry.dims) for entry in config.input} == {"ids": [-1, -1], "scale": [-1]}
    assert not any(entry.HasField("reshape") for entry in [*config.input, *config.output])


def test_static_batch_is_not_batched(tmp_path, capsys):
    path = _save(tmp_path, STATIC, "static.onnx")
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo")
    assert code == 0, err
    config = read_config(tmp_path / "repo" / "static" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 4]
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo2", "--max-batch", "4")
    assert code == 2 and "tensor 'x'" in err and "--max-batch 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "repo2").exists()


def test_external_data_is_copied_and_loads(tmp_path, capsys):
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        linear (float[batch, 4] x) => (float[batch, 3] y) { y = MatMul (x, weight) }""")
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "weight"))
    path = tmp_path / "src" / "linear.onnx"
    path.parent.mkdir()
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="linear.onnx.data", size_threshold=0)
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo")
    assert code == 0, err
    version = tmp_path / "repo" / "linear" / "1"
    assert _files(version) == ["linear.onnx.data", "model.onnx"]
    x = np.ones((2, 4), np.float32)
    (y,) = ort.InferenceSession(str(version / "model.onnx")).run(None, {"x": x})
    np.testing.assert_array_equal(y, x @ weight)


def test_config_is_parsed_by_the_schema(tmp_path):
    """read_config goes through Triton's ModelConfig: a field the schema lacks is an error, not ignored."""
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch: 8\n')
    with pytest.raises(Exception, match="max_batch"):
        read_config(bad)


# --- bad input: one line, exit code 2, nothing half-written -----------------------------------------

def _assert_one_line(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_not_an_onnx_model(tmp_path, capsys):
    bogus = tmp_path / "engine.onnx"
    bogus.write_bytes(b"\x00not a protobuf model" * 20)
    code, _, err = _deploy(capsys, bogus, "--triton", tmp_path / "repo")
    _assert_one_line(code, err, "engine.onnx", "not a readable ONNX model")
    assert not (tmp_path / "repo").exists()


def test_existing_model_of_the_same_name_is_refused_unless_force(tmp_path, capsys):
    repo = tmp_path / "repo"
    first = _save(tmp_path, STATIC, "m.onnx")
    assert _deploy(capsys, first, "--triton", repo, "--name", "shared")[0] == 0
    before = {name: (repo / name).read_bytes() for name in _files(repo) if (repo / name).is_file()}
    other = _save(tmp_path, TOKENS, "other.onnx")
    code, _, err = _deploy(capsys, other, "--triton", repo, "--name", "shared")
    _assert_one_line(code, err, "shared", "--force")
    assert {name: (repo / name).read_bytes() for name in _files(repo) if (repo / name).is_file()} == before

    code, _, err = _deploy(capsys, other, "--triton", repo, "--name", "shared", "--force")
    assert code == 0, err
    assert _files(repo) == ["shared", "shared/1", "shared/1/model.onnx", "shared/config.pbtxt"]  # no temp folders
    assert (repo / "shared" / "1" / "model.onnx").read_bytes() == other.read_bytes()
    assert [entry.name for entry in read_config(repo / "shared" / "config.pbtxt").input] == ["ids", "scale"]


@pytest.mark.parametrize("name", ["my model", "a/b", "..", ".hidden", "unet:v2", "é"])
def test_names_triton_rejects(tmp_path, capsys, name):
    path = _save(tmp_path, STATIC, "m.onnx")
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo", "--name", name)
    _assert_one_line(code, err, "not a valid Triton model name", "--name")
    assert not (tmp_path / "repo").exists()


def test_default_name_that_triton_rejects_asks_for_name(tmp_path, capsys):
    path = _save(tmp_path, STATIC, "my model.onnx")
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo")
    _assert_one_line(code, err, "'my model'", "--name")


def test_bad_options_and_a_file_as_repository(tmp_path, capsys):
    path = _save(tmp_path, STATIC, "m.onnx")
    code, _, err = _deploy(capsys, path, "--triton", tmp_path / "repo", "--instances", "0")
    _assert_one_line(code, err, "--instances")
    occupied = tmp_path / "occupied"
    occupied.write_text("a file, not a folder")
    code, _, err = _deploy(capsys, path, "--triton", occupied)
    _assert_one_line(code, err, "occupied", "not a folder")
    assert not (tmp_path / "repo").exists() and occupied.read_text() == "a file, not a folder"
