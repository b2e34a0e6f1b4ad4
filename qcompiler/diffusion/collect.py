"""Timestep-aware calibration: run the float DDIM sampler and record the denoiser's inputs at every step.

docs/algorithms.md §4 (after Q-Diffusion / TFMQ-DM): calibration data for a diffusion model
must come from the trajectories the model actually visits, at every timestep, for both the
conditional and the unconditional (guidance) halves. ``collect`` samples ``prompts`` images
with the float denoiser and writes one ``.npz`` per (prompt batch, DDIM step) in the
project's calibration format (``qcompiler.calibration.readers``):

- ``sample`` (2B, C, H, W), ``timestep`` (2B,) and the conditioning input,
  ``encoder_hidden_states`` (2B, L, D) float32 (text-conditioned UNet) or ``class_labels``
  (2B,) int64 (class-conditioned DiT; the null class on unconditional rows): exactly the
  denoiser's feeds, rows 0..B−1 unconditional (empty prompt), rows B..2B−1 conditional;
- ``__timestep__`` (2B,) int64: the timestep of every row;
- ``__label__`` (2B,) int64: the prompt's label (``prompt_labels``), −1 on unconditional rows;
- ``__step__`` (2B,) int64: the DDIM step index (0 = the noisiest).

Files are named ``b{batch:03d}_s{step:03d}.npz``, so file-name order walks every timestep of
the first prompts before the next prompts: taking the first k files (``--calib-limit``) keeps
the timesteps uniformly covered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.diffusion.conditioning import conditioner_for
from qcompiler.diffusion.sampler import OnnxDenoiser, SamplerConfig, config_for, sample
from qcompiler.diffusion.text import prompts_for


@dataclass(frozen=True)
class CollectResult:
    """Where the files went and what they cover."""

    folder: Path
    files: int
    samples: int
    timesteps: tuple[int, ...]


class _Recorder:
    """The sampler hook: writes each denoiser call's feeds plus metadata to the next file."""

    def __init__(self, folder: Path, labels: np.ndarray, batch_size: int):
        self.folder, self.labels, self.batch_size = folder, labels, batch_size
        self.batch, self.files, self.samples, self.timesteps = -1, 0, 0, set()

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> None:
        if step == 0:
            self.batch += 1
        rows = len(feeds["sample"]) // 2
        start = self.batch * self.batch_size
        labels = self.labels[start:start + rows]
        timestep = feeds["timestep"].astype(np.int64)
        np.savez(self.folder / f"b{self.batch:03d}_s{step:03d}.npz", **feeds, __timestep__=timestep,
                 __label__=np.concatenate([np.full(rows, -1, np.int64), labels]),
                 __step__=np.full(2 * rows, step, np.int64))
        self.files += 1
        self.samples += 2 * rows
        self.timesteps.add(int(timestep[0]))


def collect(denoiser_path: str | os.PathLike, out_dir: str | os.PathLike, prompts: int = 64,
            config: SamplerConfig | None = None, seed: int = 0) -> CollectResult:
    """Sample ``prompts`` images (seeds ``seed, seed+1, ...``) and write every step's feeds to ``out_dir``.

    Stale ``.npz`` files in ``out_dir`` are removed first so the folder holds one collection.
    """
    config = config or config_for(denoiser_path)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.npz"):
        stale.unlink()
    denoiser = OnnxDenoiser(denoiser_path)
    condition = conditioner_for(denoiser_path, denoiser.condition_input)
    captions, labels = prompts_for(prompts, denoiser_path)
    recorder = _Recorder(folder, labels, config.batch_size)
    sample(denoiser, condition(captions), condition.empty(), list(range(seed, seed + prompts)),
           config, hook=recorder)
    return CollectResult(folder, recorder.files, recorder.samples, tuple(sorted(recorder.timesteps, reverse=True)))
