"""`qcompile inspect` writes the JSON and the PNGs, prints the tables, and fails in one line on bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qcompiler.cli.main import main
from tests import graphs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def workspace(tmp_path):
    model_path = tmp_path / "attention.onnx"
    onnx.save(graphs.attention_model(d=8, tokens=4), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        np.savez(calib / f"{index:03d}.npz", x=rng.standard_normal((3, 4, 8)).astype(np.float32))
    return tmp_path, model_path, calib


def test_writes_json_and_every_plot(workspace, capsys):
    tmp_path, model_path, calib = workspace
    out, plots = tmp_path / "inspect.json", tmp_path / "plots"
    code = main(["inspect", str(model_path), "--calib", str(calib), "--json", str(out), "--plots", str(plots),
                 "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["calibration"]["samples"] == 6
    assert {"activations", "systematic_channels", "weights", "attention", "recommendations", "recipe"} <= set(report)
    assert [site["kind"] for site in report["attention"]] == ["self"]
    names = sorted(path.name for path in plots.iterdir())
    assert names == ["attention_mass.png", "channel_absmax.png", "histograms.png", "outlier_counts.png"]
    assert sorted(report["plots"]) == sorted(str(plots / name) for name in names)
    for name in names:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC


def test_prints_the_tables_and_the_recipe(workspace, capsys):
    _, model_path, calib = workspace
    assert main(["inspect", str(model_path), "--calib", str(calib), "--tau", "8"]) == 0
    printed = capsys.readouterr().out
    for needle in ("Activation outliers", "τ = 8", "Attention outliers", "suggested recipe:"):
        assert needle in printed


def test_missing_calibration_is_one_line_and_writes_nothing(workspace, capsys):
    tmp_path, model_path, _ = workspace
    out = tmp_path / "inspect.json"
    code = main(["inspect", str(model_path), "--calib", str(tmp_path / "nope"), "--json", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("qcompile: error:") and len(err.splitlines()) == 1 and "nope" in err
    assert not out.exists()
