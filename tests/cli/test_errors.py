"""Every bad input gives one line naming the file/tensor, exit code 2, and no output file."""

import os

import numpy as np
import onnx
import pytest

from qcompiler.cli.main import main
from tests import graphs


@pytest.fixture
def workspace(tmp_path):
    model = graphs.linear_model(k=16, n=8)
    model_path = tmp_path / "model.onnx"
    onnx.save(model, model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        np.savez(calib / f"{index:03d}.npz", x=rng.standard_normal((4, 4, 16)).astype(np.float32))
    return tmp_path, model_path, calib


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_clean_failure(code, err, tmp_path, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not list(tmp_path.rglob("out*")), "an output file was left behind"


def test_missing_model(workspace, capsys):
    tmp, _, calib = workspace
    code, err = _run(capsys, tmp / "nope.onnx", "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "nope.onnx", "not found")


def test_not_onnx(workspace, capsys):
    tmp, _, calib = workspace
    bogus = tmp / "text.onnx"
    bogus.write_text("this is not a protobuf" * 10)
    code, err = _run(capsys, bogus, "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "text.onnx", "not a readable ONNX model")


def test_truncated_model(workspace, capsys):
    tmp, model_path, calib = workspace
    data = model_path.read_bytes()
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    code, err = _run(capsys, truncated, "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "truncated.onnx")


def _with_external_data(tmp, model_path):
    """A copy of the model in tmp/ext/ with every weight in model.onnx.data."""
    external = tmp / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(model_path), external, save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return external


def test_missing_external_data(workspace, capsys):
    tmp, model_path, calib = workspace
    external = _with_external_data(tmp, model_path)
    os.remove(external.parent / "model.onnx.data")
    code, err = _run(capsys, external, "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "model.onnx.data", "W")


def test_truncated_external_data(workspace, capsys):
    tmp, model_path, calib = workspace
    external = _with_external_data(tmp, model_path)
    data = external.parent / "model.onnx.data"
    os.truncate(data, data.stat().st_size - 8)  # the last tensor (the bias b) loses two floats
    code, err = _run(capsys, external, "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "model.onnx.data", "'b'", "truncated")


def test_unwritable_output_folder_is_named_before_loading(workspace, capsys, monkeypatch):
    import qcompiler.api as api

    tmp, model_path, calib = workspace
    locked = tmp / "locked"
    locked.mkdir()
    real_access = os.access
    # The permission check itself (root may write anywhere, so chmod cannot show it here).
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    monkeypatch.setattr(api, "_load", lambda *_: pytest.fail("the model was loaded before the folder check"))
    code, err = _run(capsys, model_path, "--calib", calib, "-o", locked / "out.onnx")
    assert code == 2 and "locked" in err and "not writable" in err and len(err.splitlines()) == 1


def test_calibration_name_mismatch(workspace, capsys):
    tmp, model_path, _ = workspace
    bad = tmp / "badnames"
    bad.mkdir()
    np.savez(bad / "0.npz", pixels=np.zeros((1, 4, 16), np.float32))
    code, err = _run(capsys, model_path, "--calib", bad, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "x", "pixels")


def test_calibration_shape_mismatch(workspace, capsys):
    tmp, model_path, _ = workspace
    bad = tmp / "badshape"
    bad.mkdir()
    np.savez(bad / "0.npz", x=np.zeros((1, 4, 15), np.float32))
    code, err = _run(capsys, model_path, "--calib", bad, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "'x'", "0.npz")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_calibration_nan_inf(workspace, capsys, bad_value):
    tmp, model_path, _ = workspace
    bad = tmp / "nonfinite"
    bad.mkdir()
    values = np.zeros((1, 4, 16), np.float32)
    values[0, 1, 2] = bad_value
    np.savez(bad / "0.npz", x=values)
    code, err = _run(capsys, model_path, "--calib", bad, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "'x'", "0.npz")


def test_unknown_recipe(workspace, capsys):
    tmp, model_path, calib = workspace
    code, err = _run(capsys, model_path, "--recipe", "magic", "--calib", calib, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "magic", "minmax")


def test_unwritable_output(workspace, capsys):
    tmp, model_path, calib = workspace
    code, err = _run(capsys, model_path, "--calib", calib, "-o", tmp / "missing_dir" / "out.onnx")
    _assert_clean_failure(code, err, tmp, "missing_dir", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_folder(workspace, capsys):
    tmp, model_path, calib = workspace
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code, err = _run(capsys, model_path, "--calib", calib, "-o", locked / "out.onnx")
    locked.chmod(0o700)
    _assert_clean_failure(code, err, tmp, "not writable")


def test_success_writes_model_and_report(workspace, capsys):
    tmp, model_path, calib = workspace
    out = tmp / "good.onnx"
    assert main([str(model_path), "--calib", str(calib), "-o", str(out), "--quiet"]) == 0
    assert out.is_file() and (tmp / "good.onnx.report.json").is_file()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_model_with_external_data_compiles(workspace, capsys):
    tmp, model_path, calib = workspace
    external = tmp / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(model_path), external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    out = tmp / "ext" / "quantized.onnx"
    assert main([str(external), "--calib", str(calib), "-o", str(out), "--quiet"]) == 0
    quantized = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)


def test_constant_node_values_in_external_data_compile(workspace, capsys):
    # torch's exporter stores large Constant-node values (not only initializers) as external data.
    tmp, _, calib = workspace
    model = graphs.linear_model(k=16, n=8)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    external = tmp / "const" / "model.onnx"
    external.parent.mkdir()
    (external.parent / "model.onnx.data").write_bytes(weight.raw_data)
    value = onnx.TensorProto(name="W", dims=weight.dims, data_type=weight.data_type,
                             data_location=onnx.TensorProto.EXTERNAL)
    for key, text in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(len(weight.raw_data)))):
        value.external_data.add(key=key, value=text)
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["W"], value=value, name="W_const"))
    model.graph.initializer.remove(weight)
    onnx.save(model, external)
    out = tmp / "const" / "quantized.onnx"
    assert main([str(external), "--calib", str(calib), "-o", str(out), "--quiet"]) == 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


def test_missing_output_folder_is_reported_before_the_model_is_loaded(tmp_path, monkeypatch):
    """A bad -o is named without reading the (possibly multi-GB) model first."""
    import qcompiler.api as api
    from qcompiler.errors import QCompileError
    from qcompiler.models import DIGITS_VIT

    def refuse(*_):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(api, "_load", refuse)
    with pytest.raises(QCompileError, match="output folder"):
        api.quantize(DIGITS_VIT, "minmax", None, tmp_path / "missing" / "x.onnx")


# Issue cases: each with its message and exit code.

@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_output_under_proc_is_bad_input_not_a_traceback(workspace, capsys):
    tmp, model_path, calib = workspace
    code, err = _run(capsys, model_path, "--calib", calib, "-o", "/proc/x.onnx")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("qcompile: error: /proc/x.onnx: cannot write in output folder /proc"), err


def test_text_file_as_model_is_named_before_missing_calibration(tmp_path, capsys):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("just some text, not a model\n" * 5)
    code, err = _run(capsys, bogus, "-o", tmp_path / "out.onnx")  # no --calib, no notes.calib/
    _assert_clean_failure(code, err, tmp_path, "notes.onnx", "not a readable ONNX model")
    assert "calibration" not in err


def test_missing_calibration_is_reported_before_any_pass_runs(workspace, capsys, monkeypatch):
    from qcompiler.passes import QuantizeWeights

    tmp, model_path, _ = workspace
    monkeypatch.setattr(QuantizeWeights, "call", lambda *_: pytest.fail("a pass ran before the pre-flight"))
    code, err = _run(capsys, model_path, "-o", tmp / "out.onnx")
    _assert_clean_failure(code, err, tmp, "model.onnx", "needs calibration data", "--calib DIR")


def _broken_quantize_weights(monkeypatch):
    from qcompiler.passes import QuantizeWeights

    def call(self, ctx):
        for node in ctx.graph.nodes:
            raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(QuantizeWeights, "call", call)


def test_a_bug_in_a_pass_is_an_internal_error_with_exit_1(workspace, capsys, monkeypatch):
    tmp, model_path, calib = workspace
    _broken_quantize_weights(monkeypatch)
    code, err = _run(capsys, model_path, "--calib", calib, "-o", tmp / "out.onnx")
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qcompile: internal error in pass 'quantize_weights' on node 'fc': "
                               "ZeroDivisionError: simulated bug"), err
    assert "--debug" in lines[0]
    assert not list(tmp.rglob("out*"))


def test_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    tmp, model_path, calib = workspace
    _broken_quantize_weights(monkeypatch)
    code, err = _run(capsys, model_path, "--calib", calib, "-o", tmp / "out.onnx", "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: simulated bug" in err


def test_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    code, err = _run(capsys, "collect", tmp_path / "denoiser.onnx", "-o", tmp_path / "calib")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "qcompile collect needs the optional dependency 'diffusers'" in err and '.[export]' in err


def test_output_path_equal_to_input_is_refused_unless_forced(workspace, capsys):
    tmp, model_path, calib = workspace
    before = model_path.read_bytes()
    code, err = _run(capsys, model_path, "--calib", calib, "-o", model_path)
    assert code == 2 and "is the input model" in err and "--force" in err
    assert model_path.read_bytes() == before
    assert main([str(model_path), "--calib", str(calib), "-o", str(model_path), "--force", "--quiet"]) == 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(model_path).graph.node)


def test_help_lists_every_subcommand_and_shared_flags(capsys):
    from qcompiler.cli.main import SUBCOMMANDS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert all(flag in text for flag in ("--quiet", "--verbose", "--debug")), name
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--calib" in capsys.readouterr().out
