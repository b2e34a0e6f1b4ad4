"""Timestep-aware calibration from a user's pipeline: record the denoiser's feeds at every step.

The pipeline (``pipeline.load_pipeline``: optimum's ORT diffusion pipeline, its own scheduler,
text encoder and guidance) samples one image per prompt; the denoiser session's proxy hands
every call's feeds to a recorder, which writes one ``.npz`` per (prompt batch, denoising step)
in the project's calibration format (``qcompiler.calibration.readers``), the same as the
zoo's ``collect``:

- the denoiser's feeds, exactly as the pipeline fed them (e.g. ``sample`` (2B, C, h, w),
  ``timestep``, ``encoder_hidden_states`` (2B, L, D)), except that a one-value ``timestep`` fed to
  a per-row timestep input of shape (1,) is stored repeated per row; with classifier-free guidance rows
  0..B−1 are the unconditional half and rows B..2B−1 the prompted half (diffusers' order);
- ``__timestep__`` (rows,) int64, ``__step__`` (rows,) int64 (0 = the noisiest), and
  ``__prompt__`` (rows,) int64: the prompt's index, −1 on unconditional rows.

``max_files`` bounds the disk used: the kept (batch, step) files are spread uniformly over
the steps (each step keeps ⌊F/S⌋ or ⌈F/S⌉ files, on batches spread over the prompts; with
F < S, F steps evenly spaced from the first to the last), and batches with no kept file are
not sampled at all. ``collection.json`` beside the files records the prompts and the resolved
settings. Files are written to a staging folder and moved in at the end, so an interrupted
run leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qcompiler.diffusion.pipeline import GenerationSettings, PipelineFolder, generate, load_pipeline
from qcompiler.errors import QCompileError


@dataclass(frozen=True)
class PipelineCollectResult:
    folder: Path
    files: int
    samples: int
    timesteps: tuple[int, ...]
    settings: GenerationSettings


def kept_files(batches: int, steps: int, max_files: int | None) -> set[tuple[int, int]]:
    """The (batch, step) pairs to write: all of them, or ``max_files`` spread uniformly over steps."""
    if max_files is None or max_files >= batches * steps:
        return {(b, s) for b in range(batches) for s in range(steps)}
    per_step = np.full(steps, max_files // steps)
    if max_files % steps:  # the remainder goes to evenly spaced steps (distinct: their spacing is > 1)
        per_step[np.linspace(0, steps - 1, max_files % steps).round().astype(int)] += 1
    return {(int(b), s) for s in range(steps) if per_step[s]
            for b in np.linspace(0, batches - 1, per_step[s]).round()}


class _Recorder:
    """The feed hook: counts steps within a pipeline call and writes the kept ones."""

    def __init__(self, folder: Path, keep: set[tuple[int, int]], bar):
        self.folder, self.keep, self.bar = folder, keep, bar
        self.batch, self.step, self.prompts = -1, 0, np.zeros(0, np.int64)
        self.files, self.samples, self.timesteps = 0, 0, set()

    def start_batch(self, start: int, stop: int, batch: int) -> None:
        self.batch, self.step, self.prompts = batch, 0, np.arange(start, stop, dtype=np.int64)

    def __call__(self, feeds: dict) -> None:
        step, self.step = self.step, self.step + 1
        self.bar.update(1)
        if (self.batch, step) not in self.keep:
            return
        arrays = {name: np.array(value) for name, value in feeds.items() if value is not None}
        rows = max((a.shape[0] for a in arrays.values() if a.ndim >= 1), default=1)
        n = len(self.prompts)
        if rows == 2 * n:  # classifier-free guidance: [unconditional; prompted]
            prompt = np.concatenate([np.full(n, -1, np.int64), self.prompts])
        else:
            prompt = self.prompts if rows == n else np.full(rows, -1, np.int64)
        t = np.rint(np.asarray(arrays["timestep"], np.float64).reshape(-1)).astype(np.int64)
        timestep = np.broadcast_to(t if t.size in (1, rows) else t[:1], (rows,)).copy()
        if arrays["timestep"].shape == (1,) and rows > 1:
            # A denoiser with a per-row timestep input (batch,) that optimum feeds one value for the
            # whole batch: stored per row, so every calibration array shares the leading batch axis.
            arrays["timestep"] = np.broadcast_to(arrays["timestep"], (rows,)).copy()
        np.savez(self.folder / f"b{self.batch:03d}_s{step:03d}.npz", **arrays, __timestep__=timestep,
                 __step__=np.full(rows, step, np.int64), __prompt__=prompt)
        self.files += 1
        self.samples += rows
        self.timesteps.add(int(timestep[0]))


def collect_pipeline(folder: PipelineFolder, out_dir: str | os.PathLike, prompts: list[str],
                     settings: GenerationSettings = GenerationSettings(), max_files: int | None = None,
                     threads: int | None = None) -> PipelineCollectResult:
    """Sample ``prompts`` through the pipeline and write the kept steps' denoiser feeds to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise QCompileError(f"{out}: exists and is not a folder")
    recorder = _Recorder(Path(), set(), None)
    # Loaded before anything is written: a denoiser ORT cannot load fails with nothing on disk.
    pipe = load_pipeline(folder, hook=lambda feeds: recorder(feeds), threads=threads)
    settings = settings.resolved(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = recorder.folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        batches = -(-len(prompts) // settings.batch_size)
        recorder.keep = kept_files(batches, settings.steps, max_files)
        needed = sorted({b for b, _ in recorder.keep})
        with tqdm(total=len(needed) * settings.steps, desc=f"collecting {folder.root.name}", unit="step",
                  leave=False, disable=None) as bar:
            recorder.bar = bar
            for batch in needed:
                start = batch * settings.batch_size
                generate(pipe, prompts[start:start + settings.batch_size], settings, first=start,
                         before_batch=lambda a, b, batch=batch: recorder.start_batch(a, b, batch))
        (staging / "collection.json").write_text(json.dumps(
            {"pipeline": str(folder.root), "denoiser": folder.denoiser_name, "prompts": prompts,
             "settings": asdict(settings), "max_files": max_files, "files": recorder.files}, indent=2))
        out.mkdir(exist_ok=True)
        for stale in out.glob("*.npz"):
            stale.unlink()
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PipelineCollectResult(out, recorder.files, recorder.samples,
                                 tuple(sorted(recorder.timesteps, reverse=True)), settings)
