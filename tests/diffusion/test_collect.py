"""The timestep-aware collector writes the denoiser's feeds per step in the calibration format."""

from __future__ import annotations

import numpy as np
import onnx

from qcompiler.calibration.readers import load_calibration
from qcompiler.diffusion.collect import collect
from qcompiler.diffusion.sampler import config_for


def test_collect_writes_every_step_with_its_timestep(tiny_denoiser, tmp_path):
    config = config_for(tiny_denoiser, steps=3, batch_size=2)
    result = collect(tiny_denoiser, tmp_path / "calib", prompts=3, config=config)
    files = sorted((tmp_path / "calib").glob("*.npz"))
    # 3 prompts in batches of 2 -> 2 sampler batches, each 3 DDIM steps -> 6 files.
    assert result.files == len(files) == 6
    # 'leading' DDIM spacing with offset 1: t_k = k·(T // n) + 1 with T = 1000, n = 3.
    assert result.timesteps == (667, 334, 1)
    inputs = {i.name for i in onnx.load(tiny_denoiser).graph.input}
    first = np.load(files[0])
    assert {k for k in first.files if not k.startswith("__")} == inputs
    assert {"__timestep__", "__label__", "__step__"} <= set(first.files)
    for path in files:
        data = np.load(path)
        rows = len(data["sample"])
        assert rows % 2 == 0 and len(data["__timestep__"]) == rows
        np.testing.assert_array_equal(data["__timestep__"], data["timestep"].astype(np.int64))
        # Unconditional half first (label -1), then the prompted digits.
        assert (data["__label__"][: rows // 2] == -1).all() and (data["__label__"][rows // 2:] >= 0).all()


def test_collected_folder_is_valid_calibration(tiny_denoiser, tmp_path):
    collect(tiny_denoiser, tmp_path, prompts=2, config=config_for(tiny_denoiser, steps=2))
    batches = load_calibration(tmp_path, onnx.load(tiny_denoiser))
    assert len(batches) == 2
    assert sorted(int(b.metadata["__timestep__"][0]) for b in batches) == [1, 501]
