"""Pipeline inputs: bad folders and prompt files fail in one line, exit 2, nothing written; prompts; --max-files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from qcompiler.cli.main import main
from qcompiler.diffusion.pipeline_collect import kept_files
from qcompiler.diffusion.prompts import GENERIC_PROMPTS, prompts_from


@pytest.fixture
def fake_pipeline(tmp_path):
    """The layout only (enough for every check that runs before a model loads)."""
    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "model.onnx").write_bytes(b"")
    return root


def _fails_cleanly(capsys, tmp_path, argv, *needles):
    code = main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qcompile: error:"), lines
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert not list(tmp_path.rglob("out*")), "an output was written"


@pytest.mark.parametrize("command", ["collect", "eval-diffusion", "compile"])
def test_folder_without_model_index_is_not_a_pipeline(command, tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    extra = {"collect": ["-o", tmp_path / "out"], "eval-diffusion": [tmp_path / "q.onnx", "--json", tmp_path / "out.json"],
             "compile": ["-o", tmp_path / "out"]}[command]
    _fails_cleanly(capsys, tmp_path, [command, folder, *extra], folder, "not a diffusion pipeline folder")


def test_pipeline_without_denoiser(fake_pipeline, tmp_path, capsys):
    (fake_pipeline / "unet" / "model.onnx").unlink()
    _fails_cleanly(capsys, tmp_path, ["collect", fake_pipeline, "-o", tmp_path / "out"], fake_pipeline,
                   "without a denoiser")


def test_model_index_not_json(fake_pipeline, tmp_path, capsys):
    (fake_pipeline / "model_index.json").write_text("{nope")
    _fails_cleanly(capsys, tmp_path, ["collect", fake_pipeline, "-o", tmp_path / "out"], "model_index.json",
                   "not valid JSON")


@pytest.mark.parametrize("content, message", [(b"", "no prompts"), (b"\n  \n", "no prompts"),
                                              (b"\x89PNG\r\n\x1a\n\0\0\0", "not a text file"),
                                              (b"caf\xe9 latin-1", "not a text file")])
def test_bad_prompt_file(fake_pipeline, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    _fails_cleanly(capsys, tmp_path, ["collect", fake_pipeline, "--prompts", prompts, "-o", tmp_path / "out"],
                   prompts, message)
    _fails_cleanly(capsys, tmp_path, ["eval-diffusion", fake_pipeline, fake_pipeline / "unet" / "model.onnx",
                                      "--prompts", prompts, "--json", tmp_path / "out.json"], prompts, message)


def test_missing_prompt_file(fake_pipeline, tmp_path, capsys):
    _fails_cleanly(capsys, tmp_path, ["collect", fake_pipeline, "--prompts", tmp_path / "nope.txt", "-o",
                                      tmp_path / "out"], "nope.txt", "not found")


def test_prompt_file_lines_and_builtin_count(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a red car \n\nthe sea\n", encoding="utf-8")
    assert prompts_from(str(path)) == ["a red car", "the sea"]
    many = prompts_from("20")
    assert len(many) == 20 and many[:len(GENERIC_PROMPTS)] == list(GENERIC_PROMPTS) and many[16] == GENERIC_PROMPTS[0]


@pytest.mark.parametrize("batches, steps, max_files", [(4, 10, 3), (4, 10, 12), (4, 10, 39), (3, 4, 7), (1, 5, 5),
                                                       (5, 25, 64)])
def test_max_files_is_uniform_over_steps(batches, steps, max_files):
    kept = kept_files(batches, steps, max_files)
    assert len(kept) == max_files
    assert all(0 <= b < batches and 0 <= s < steps for b, s in kept)
    per_step = Counter(s for _, s in kept)
    counts = [per_step.get(s, 0) for s in range(steps)]
    assert max(counts) - min(counts) <= 1  # uniform: every step within one file of every other
    if max_files < steps:  # evenly spaced, from the noisiest step to the last
        assert {0, steps - 1} <= set(per_step)


def test_max_files_above_total_keeps_everything():
    assert kept_files(2, 3, 100) == {(b, s) for b in range(2) for s in range(3)}
    assert kept_files(2, 3, None) == {(b, s) for b in range(2) for s in range(3)}


@pytest.mark.parametrize("command", ["collect", "compile"])
def test_denoiser_that_is_not_onnx(command, fake_pipeline, tmp_path, capsys):
    (fake_pipeline / "unet" / "model.onnx").write_text("not a protobuf " * 8)
    argv = {"collect": ["collect", fake_pipeline, "--prompts", "2", "-o", tmp_path / "out"],
            "compile": [fake_pipeline, "--calib", tmp_path, "-o", tmp_path / "out"]}[command]
    _fails_cleanly(capsys, tmp_path, argv, fake_pipeline / "unet" / "model.onnx")
