"""--w8-budget: parsed as a share, adds mixed_precision before quantize_weights, reported; bad use exits 2."""

import json

import numpy as np
import onnx
import pytest

from qcompiler.cli.compile_command import parse_share
from qcompiler.cli.main import main
from qcompiler.recipes import get_recipe, with_mixed_precision
from tests.passes.test_mixed_precision import chain_model


@pytest.fixture
def workspace(tmp_path):
    model_path = tmp_path / "model.onnx"
    onnx.save(chain_model(), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        np.savez(calib / f"{index:03d}.npz", x=rng.standard_normal((4, 4, 32)).astype(np.float32))
    return tmp_path, model_path, calib


def test_parse_share():
    assert parse_share("10%") == pytest.approx(0.1) and parse_share("0.25") == 0.25 and parse_share("0%") == 0
    for bad in ("100%", "-1%", "ten"):
        with pytest.raises(ValueError):
            parse_share(bad)


def test_recipe_gets_the_pass_with_its_weight_config():
    dgq = with_mixed_precision(get_recipe("dgq"), 0.1)
    names = [step.pass_name for step in dgq.steps]
    assert names.index("mixed_precision") == names.index("quantize_weights") - 1
    mixed = dgq.steps[names.index("mixed_precision")].config
    assert mixed.w8_budget == 0.1 and mixed.weights == dgq.steps[names.index("quantize_weights")].config


def test_compile_reports_the_w8_layers(workspace, capsys):
    tmp_path, model_path, calib = workspace
    out = tmp_path / "out.onnx"
    code = main([str(model_path), "--calib", str(calib), "-o", str(out), "--wbits", "4", "--w8-budget", "25%",
                 "--set", "mixed_precision.rows=2"])
    assert code == 0
    report = json.loads(out.with_name("out.onnx.report.json").read_text())
    kept = [layer["node"] for layer in report["mixed_precision"]["kept_at_8"]]
    assert kept and report["mixed_precision"]["w8_share"] <= 0.25 and report["mixed_precision"]["rows"] == 2
    assert "kept at W8" in capsys.readouterr().out and kept[0] in out.with_name("out.onnx.report.json").read_text()


def test_budget_at_w8_is_one_line_exit_2(workspace, capsys):
    tmp_path, model_path, calib = workspace
    code = main([str(model_path), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"), "--quiet", "--w8-budget", "10%"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--wbits 4" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.onnx").exists()


def test_budget_out_of_range_is_a_usage_error(workspace, capsys):
    tmp_path, model_path, calib = workspace
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and one error line, exit code 2
        main([str(model_path), "--calib", str(calib), "--wbits", "4", "--w8-budget", "150%"])
    assert exit_info.value.code == 2 and "--w8-budget: invalid share" in capsys.readouterr().err
