"""DDIM sampling with classifier-free guidance, the denoiser and text encoder run by ONNX Runtime.

The loop (Song et al. 2021, DDIM with η = 0; Ho & Salimans 2022, classifier-free guidance):
for each timestep t of the DDIM schedule, one denoiser call on the batch ``[x_t; x_t]`` with
contexts ``[c_empty; c_prompt]`` gives ``(ε_u, ε_c)``; the guided prediction is
``ε = ε_u + w·(ε_c − ε_u)`` and diffusers' ``DDIMScheduler.step`` computes ``x_{t-1}``. The
scheduler math is diffusers' (a library, not hand-written); only the denoiser differs between
a float and a quantized model, so the same loop, seeds and contexts drive both.

A denoiser ONNX has inputs ``sample`` (B, C, H, W), ``timestep`` (B,) and one conditioning
input (``CONDITION_INPUTS``): ``encoder_hidden_states`` (B, L, D) float32 for a text-conditioned
denoiser (the UNet) or ``class_labels`` (B,) int64 for a class-conditioned one (the DiT, whose
null class is the unconditional context); ``timestep`` may be float32 or int64 (read from the
graph). The loop only concatenates and broadcasts contexts along the batch axis, so it is the
same for both; ``conditioning.conditioner_for`` maps prompts to the contexts. The training
schedule comes from ``<denoiser>.json`` (``scheduler_config``) when it exists, as
``models/export_unet.py`` and ``models/export_dit.py`` write it, else from
``SamplerConfig.scheduler_config``.

Each image's initial noise comes from its own seed (``numpy.random.default_rng(seed)``), so
an image depends on its seed and prompt only, not on which batch it was drawn in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qcompiler.errors import QCompileError

#: The trained UNet's schedule (models/train_unet.py); used when no JSON sits beside the model.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                            "prediction_type": "epsilon"}
#: Called with the feeds of every denoiser call and the DDIM step index (the collector's hook).
StepHook = Callable[[dict[str, np.ndarray], int], None]
#: Conditioning input name -> the dtype its contexts are fed as.
CONDITION_INPUTS = {"encoder_hidden_states": np.float32, "class_labels": np.int64}


def _condition_input(path: Path, names: set[str]) -> str:
    """The one conditioning input among ``names``; QCompileError naming the accepted ones otherwise."""
    missing = {"sample", "timestep"} - names
    if missing:
        raise QCompileError(f"{path}: not a denoiser, it lacks input(s) {sorted(missing)}")
    found = [name for name in CONDITION_INPUTS if name in names]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise QCompileError(f"{path}: a denoiser needs exactly one conditioning input, "
                            f"'encoder_hidden_states' (text-conditioned) or 'class_labels' (class-conditioned); "
                            f"it has {what} (inputs: {sorted(names)})")
    return found[0]


def condition_input_of(path: str | os.PathLike) -> str:
    """``"encoder_hidden_states"`` or ``"class_labels"``, read from the ONNX graph's inputs."""
    from qcompiler.graph import load_model

    path = Path(path)
    graph = load_model(path, load_external_data=False).graph  # QCompileError naming the file if unreadable
    initializers = {t.name for t in graph.initializer}
    return _condition_input(path, {i.name for i in graph.input if i.name not in initializers})


@dataclass(frozen=True)
class SamplerConfig:
    """DDIM settings; the timestep grid is Stable Diffusion's ('leading' spacing, offset 1).

    With 25 steps the grid is t = 961, 921, ..., 1. Not 'trailing' (t = 999, 959, ...): under
    the cosine schedule ᾱ_999 ≈ 2e-9, so the first DDIM step multiplies the ε-prediction's
    error by sqrt(ᾱ_959 / ᾱ_999) ≈ 1,300 and the images come out as binary speckle (measured
    on the step-1,500 EMA checkpoint, guidance 4: prompt accuracy 32% of 100 samples with
    'trailing', 88% of 50 with this grid). ``clip_sample`` stays off: clipping x̂₀ to [-1, 1]
    measured 52% of the same 50.
    """

    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 16
    scheduler_config: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    #: DDIM's η: 0 deterministic (default), 1 DDPM's variance. Step noise z comes from each image's seed.
    eta: float = 0.0
    #: With η > 0, shrink the step noise by a PTQD model's residual variance (``diffusion/ptqd.py``).
    ptqd_variance: bool = True

    def scheduler(self):
        from diffusers import DDIMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if k != "ptqd"}
        scheduler = DDIMScheduler(**config, timestep_spacing="leading", steps_offset=1,
                                  set_alpha_to_one=False, clip_sample=False)
        scheduler.set_timesteps(self.steps)
        return scheduler


def model_metadata(denoiser_path: str | os.PathLike) -> dict:
    """``<model>.json`` beside a float model, else ``{}`` (quantized copies carry no JSON)."""
    path = Path(denoiser_path).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def config_for(denoiser_path: str | os.PathLike, **overrides) -> SamplerConfig:
    """A SamplerConfig with the model's training schedule (from its JSON) and ``overrides``."""
    metadata = model_metadata(denoiser_path)
    if "scheduler_config" in metadata:
        overrides.setdefault("scheduler_config", metadata["scheduler_config"])
    return SamplerConfig(**overrides)


class OnnxDenoiser:
    """``noise_pred = denoiser(sample, timestep, encoder_hidden_states | class_labels)`` through an ORT session."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from qcompiler.runtimes.ort import make_session

        self.path = Path(path)
        self.session = make_session(self.path, threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        #: The conditioning input's name, one of CONDITION_INPUTS.
        self.condition_input = _condition_input(self.path, set(inputs))
        self.timestep_dtype = np.int64 if "int64" in inputs["timestep"].type else np.float32
        self.output = self.session.get_outputs()[0].name
        from qcompiler.diffusion.ptqd import read_metadata

        #: PTQD estimates from the model's metadata (``qcompile ... --ptqd``), else None.
        self.ptqd = read_metadata(self.session)

    def feeds(self, sample: np.ndarray, timestep: int, context: np.ndarray) -> dict[str, np.ndarray]:
        name = self.condition_input
        return {"sample": np.ascontiguousarray(sample, np.float32),
                "timestep": np.full(len(sample), timestep, dtype=self.timestep_dtype),
                name: np.ascontiguousarray(context, CONDITION_INPUTS[name])}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """One standard-normal (C, H, W) draw per seed, stacked: (len(seeds), C, H, W) float32."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape) for s in seeds]).astype(np.float32)


def sample_batch(denoiser: OnnxDenoiser, context: np.ndarray, empty_context: np.ndarray, seeds: Sequence[int],
                 config: SamplerConfig, hook: StepHook | None = None, image_shape=(1, 32, 32),
                 bar=None) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] for B contexts, guided against ``empty_context`` (one row).

    Contexts are (B, L, D) with ``empty_context`` (L, D) for a text-conditioned denoiser, (B,)
    labels with a scalar null class for a class-conditioned one.
    """
    import torch

    scheduler = config.scheduler()
    latents = initial_noise(seeds, image_shape)
    uncond = np.broadcast_to(empty_context, context.shape)
    both = np.concatenate([uncond, context])
    step_noise = [np.random.default_rng((int(s), 1)) for s in seeds] if config.eta > 0 else None
    for index, t in enumerate(scheduler.timesteps.tolist()):
        feeds = denoiser.feeds(np.concatenate([latents, latents]), int(t), both)
        if hook is not None:
            hook(feeds, index)
        eps_uncond, eps_cond = np.split(denoiser.run(feeds), 2)
        eps = eps_uncond + config.guidance_scale * (eps_cond - eps_uncond)
        options = {} if step_noise is None else {"eta": config.eta, "variance_noise": torch.from_numpy(
            _step_noise(step_noise, image_shape) * _ptqd_ratio(denoiser, scheduler, int(t), config))}
        latents = scheduler.step(torch.from_numpy(eps), int(t), torch.from_numpy(latents),
                                 **options).prev_sample.numpy()
        if bar is not None:
            bar.update(1)
    # Clipped to the data range as diffusers' pipelines clamp their output: metrics then compare
    # images, not out-of-range excursions of an early or badly quantized model.
    return np.clip(latents, -1.0, 1.0).astype(np.float32)


def _step_noise(generators: list, image_shape) -> np.ndarray:
    """One z per image from its own generator: the same z for a float and a quantized run."""
    return np.stack([g.standard_normal(image_shape) for g in generators]).astype(np.float32)


def _ptqd_ratio(denoiser: OnnxDenoiser, scheduler, t: int, config: SamplerConfig) -> float:
    """σ′_t/σ_t for a PTQD model (its residual variance taken out of the step noise), else 1."""
    estimates = getattr(denoiser, "ptqd", None) or config.scheduler_config.get("ptqd")
    if not config.ptqd_variance or not estimates:
        return 1.0
    from qcompiler.diffusion.ptqd import noise_ratio, residual_variance

    return noise_ratio(scheduler, t, config.eta, residual_variance(estimates, t, config.guidance_scale))[0]


def sample(denoiser: OnnxDenoiser, contexts: np.ndarray, empty_context: np.ndarray, seeds: Sequence[int],
           config: SamplerConfig, hook: StepHook | None = None, desc: str = "sampling") -> np.ndarray:
    """All images, ``config.batch_size`` prompts per denoiser call (2x rows with the unconditional half)."""
    if len(contexts) != len(seeds):
        raise ValueError(f"{len(contexts)} contexts but {len(seeds)} seeds")
    out = []
    batches = -(-len(seeds) // config.batch_size)
    # One tick per denoiser step; on stderr, shown on a terminal (a 64-image evaluation takes minutes).
    with tqdm(total=batches * config.steps, desc=desc, unit="step", leave=False, disable=None) as bar:
        for start in range(0, len(seeds), config.batch_size):
            stop = start + config.batch_size
            out.append(sample_batch(denoiser, contexts[start:stop], empty_context, seeds[start:stop], config, hook,
                                    bar=bar))
    return np.concatenate(out)
