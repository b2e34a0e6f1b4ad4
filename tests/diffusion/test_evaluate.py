"""Diffusion evaluation end to end on the tiny model, and the two CLI subcommands."""

from __future__ import annotations

import json
import math

import pytest

from qcompiler.cli.main import main
from qcompiler.diffusion.evaluate import DiffusionEvalOptions, evaluate_diffusion

def _classifier_available():
    from pathlib import Path

    import qcompiler.models

    return (Path(qcompiler.models.__file__).parent / "mnist_classifier.onnx").exists()


needs_classifier = pytest.mark.skipif(not _classifier_available(), reason="bundled MNIST classifier not built")


@needs_classifier
def test_a_model_against_itself_is_lossless(tiny_denoiser, tmp_path):
    options = DiffusionEvalOptions(samples=4, steps=2, grid_columns=2)
    result = evaluate_diffusion(tiny_denoiser, tiny_denoiser, options, grid=tmp_path / "grid.png")
    assert result["psnr_db"] == math.inf and result["psnr_db_all"] == math.inf
    assert result["psnr_db_per_image"] == [math.inf] * 4  # one per seed, for paired comparisons
    assert result["ssim"] == pytest.approx(1.0)
    assert result["accuracy"]["float"] == result["accuracy"]["quant"]
    assert result["frechet"]["float"] == pytest.approx(result["frechet"]["quant"])
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_classifier
def test_eval_diffusion_command(tiny_denoiser, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval-diffusion", str(tiny_denoiser), str(tiny_denoiser), "--samples", "3", "--steps", "2",
                 "--grid", str(tmp_path / "g.png"), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["ssim"] == pytest.approx(1.0)
    assert (tmp_path / "g.png").exists()


def test_collect_command(tiny_denoiser, tmp_path, capsys):
    code = main(["collect", str(tiny_denoiser), "--prompts", "2", "--steps", "2", "-o", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    assert "wrote 2 files (8 samples, 2 timesteps 501..1)" in capsys.readouterr().out


def test_commands_name_a_missing_model(tmp_path, capsys):
    for argv in (["collect", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out")],
                 ["eval-diffusion", str(tmp_path / "nope.onnx"), str(tmp_path / "nope.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "nope.onnx" in err[0]
    assert not (tmp_path / "out").exists()


@needs_classifier
def test_a_class_conditioned_model_evaluates_and_its_float_images_are_cached(tiny_dit, tmp_path):
    options = DiffusionEvalOptions(samples=3, steps=2, cache=str(tmp_path / "cache"))
    first = evaluate_diffusion(tiny_dit, tiny_dit, options)
    assert first["psnr_db"] == math.inf and first["accuracy"]["float"] == first["accuracy"]["quant"]
    cached = list((tmp_path / "cache").glob("tiny_dit.*.npz"))
    assert len(cached) == 1
    # A second run reads the float images back; another sampler setting is another entry.
    assert evaluate_diffusion(tiny_dit, tiny_dit, options)["frechet"] == first["frechet"]
    evaluate_diffusion(tiny_dit, tiny_dit, DiffusionEvalOptions(samples=3, steps=3, cache=options.cache))
    assert len(list((tmp_path / "cache").glob("tiny_dit.*.npz"))) == 2
