"""A user's diffusion pipeline as optimum exports it, run by optimum's ONNX Runtime pipeline classes.

A pipeline folder is what ``optimum-cli export onnx --model DIR --task text-to-image OUT``
writes: ``model_index.json``, the denoiser ``unet/model.onnx`` or ``transformer/model.onnx``
(with ``config.json``), ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae_decoder/``
and usually ``vae_encoder/``. ``open_pipeline`` checks that layout without loading anything;
``load_pipeline`` builds the pipeline through ``optimum.onnxruntime.ORTDiffusionPipeline``, so
the pipeline's own scheduler, tokenizer, text encoder, guidance and VAE run exactly as a user
runs them. qcompile touches one thing: the denoiser's ONNX Runtime session is handed to
optimum (its ``unet_session=`` / ``transformer_session=`` argument) wrapped in a
``RecordingSession``, a small proxy that shows every denoiser call's feeds to a hook before
running it, and that may run another model file (a quantized denoiser) in its place. No
library module is patched.

``generate`` draws image i from its own seed: its starting latents are
``numpy.random.default_rng(seed + i)``'s standard normal of the latent shape (C, H/f, W/f)
(``sampler.initial_noise``, the same draw as the zoo's DDIM sampler), handed to the pipeline as
``latents=``, which it scales by its scheduler's initial sigma as it would its own draw; any
other randomness comes from ``torch.Generator().manual_seed(seed + i)``, one per prompt.
Pipelines that pack latents into tokens (Flux: ``_pack_latents``) draw their starting noise
from those generators. So an image depends on its prompt and seed only, and a float and a
quantized pipeline start from the same noise.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.errors import QCompileError

#: Denoiser subfolders, in the order they are looked for.
DENOISERS = ("unet", "transformer")
MODEL_FILE = "model.onnx"
#: Called with the feeds of every denoiser call (numpy arrays, by input name).
FeedHook = Callable[[dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class PipelineFolder:
    """A checked pipeline folder: its root and which denoiser it has."""

    root: Path
    denoiser_name: str  # "unet" or "transformer"
    class_name: str     # model_index.json's _class_name, e.g. StableDiffusionPipeline

    @property
    def denoiser_path(self) -> Path:
        return self.root / self.denoiser_name / MODEL_FILE

    @property
    def vae_encoder_path(self) -> Path:
        return self.root / "vae_encoder" / MODEL_FILE


def open_pipeline(path: str | os.PathLike) -> PipelineFolder:
    """Check the layout (no model is loaded); QCompileError naming the folder or file otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise QCompileError(f"{root}: no such pipeline folder")
    index = root / "model_index.json"
    if not index.is_file():
        raise QCompileError(f"{root}: not a diffusion pipeline folder (no model_index.json); export one with "
                            "`optimum-cli export onnx --model DIR --task text-to-image OUT`")
    try:
        config = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QCompileError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise QCompileError(f"{index}: not a diffusers model index (no _class_name)")
    for name in DENOISERS:
        if (root / name / MODEL_FILE).is_file():
            return PipelineFolder(root, name, str(config["_class_name"]))
    raise QCompileError(f"{root}: pipeline without a denoiser (neither unet/{MODEL_FILE} nor "
                        f"transformer/{MODEL_FILE} exists)")


class RecordingSession:
    """An ONNX Runtime session as optimum uses it, showing each ``run``'s feeds to ``hook`` first.

    ``model_path`` is what optimum reads the denoiser's ``config.json`` beside: the pipeline's
    own denoiser path, also when the session runs a quantized model stored elsewhere. Every other
    attribute (inputs, outputs, providers) is the wrapped session's.
    """

    def __init__(self, session, model_path: str | os.PathLike, hook: FeedHook | None = None):
        self._session = session
        self._model_path = str(model_path)
        self.hook = hook

    def run(self, output_names, input_feed, run_options=None):
        if self.hook is not None:
            self.hook(input_feed)
        return self._session.run(output_names, input_feed, run_options)

    def __getattr__(self, name):
        return getattr(self._session, name)


def load_pipeline(folder: PipelineFolder, denoiser: str | os.PathLike | None = None, hook: FeedHook | None = None,
                  threads: int | None = None):
    """optimum's ORT pipeline for ``folder``, its denoiser session replaced by ``denoiser`` when given."""
    from optimum.onnxruntime import ORTDiffusionPipeline

    from qcompiler.runtimes.ort import make_session

    session = RecordingSession(make_session(Path(denoiser or folder.denoiser_path), threads=threads),
                               folder.denoiser_path, hook)
    try:
        pipe = ORTDiffusionPipeline.from_pretrained(folder.root, export=False, use_io_binding=False,
                                                    **{f"{folder.denoiser_name}_session": session})
    except (KeyError, ValueError) as exc:
        raise QCompileError(f"{folder.root}: optimum cannot load this pipeline ({folder.class_name}): "
                            f"{str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)  # qcompile shows one bar over all denoiser steps
    return pipe


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; None means the pipeline's own default (its ``__call__``'s, or its config's size)."""

    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 4  # prompts per pipeline call
    seed: int = 0        # image i uses seed + i

    def resolved(self, pipe) -> "GenerationSettings":
        """Every None replaced by the value the pipeline would use."""
        defaults = inspect.signature(type(pipe).__call__).parameters
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        # SD/SDXL: the denoiser's sample_size; SD3, Flux, Sana keep it as default_sample_size.
        latent = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
        size = int(latent) * int(getattr(pipe, "vae_scale_factor", 8))
        return GenerationSettings(
            steps=self.steps or int(defaults["num_inference_steps"].default),
            guidance_scale=self.guidance_scale if self.guidance_scale is not None
            else float(defaults["guidance_scale"].default),
            height=self.height or size, width=self.width or size, batch_size=self.batch_size, seed=self.seed)


def initial_latents(pipe, settings: GenerationSettings, seeds: list[int]):
    """Starting latents (B, C, H/f, W/f) float32 as a torch tensor, one seeded draw per image; None to let
    a pipeline that packs its latents (``_pack_latents``) draw them from its generators."""
    import torch

    from qcompiler.diffusion.sampler import initial_noise

    if hasattr(pipe, "_pack_latents"):
        return None
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    shape = (int(denoiser.config.in_channels), settings.height // factor, settings.width // factor)
    return torch.from_numpy(initial_noise(seeds, shape))


def generate(pipe, prompts: list[str], settings: GenerationSettings, first: int = 0,
             before_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Images (N, C, H, W) float32 in [-1, 1], one per prompt; ``before_batch(start, stop)`` before each call.

    ``prompts[i]`` is image ``first + i`` (seed ``settings.seed + first + i``; ``start``/``stop``
    count the same way). ``settings`` must be resolved (``GenerationSettings.resolved``).
    """
    import torch

    images = []
    for start in range(first, first + len(prompts), settings.batch_size):
        stop = min(start + settings.batch_size, first + len(prompts))
        if before_batch is not None:
            before_batch(start, stop)
        seeds = [settings.seed + i for i in range(start, stop)]
        out = pipe(prompt=prompts[start - first:stop - first], num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                   generator=[torch.Generator().manual_seed(s) for s in seeds],
                   latents=initial_latents(pipe, settings, seeds), output_type="np")
        images.append(np.asarray(out.images, np.float32))  # (b, H, W, C) in [0, 1]
    return (np.concatenate(images).transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)
