"""Float vs quantized denoiser inside a user's pipeline: same prompts, seeds and settings, images compared.

Two pipelines are loaded from the same folder (``pipeline.load_pipeline``): one with the float
denoiser, one with the quantized ONNX swapped into the denoiser's session. Everything else —
tokenizer, text encoder, scheduler, guidance, VAE decoder, the per-image seeds — is the same,
so any difference between the images is the quantized denoiser's. Reported (images in
[-1, 1], ``metrics``):

- ``psnr_db`` (mean over images of per-image PSNR) and ``psnr_db_all`` (all pixels at once),
  ``ssim`` (mean; colour images average SSIM over channels), quantized vs float;
- ``frechet_vae``: the Fréchet distance between the quantized and the float images' features,
  where a feature vector is the pipeline's own VAE encoder's latent mean (the first half of
  ``vae_encoder``'s ``latent_parameters``), average-pooled to a 4×4 grid (C·16 numbers per
  image). This is not FID: no Inception (or CLIP image) weights are available offline, and the
  VAE latent describes image content at the pixel/texture level rather than semantics. It is a
  distribution distance in a space the pipeline itself defines, comparable between quantized
  variants of one pipeline at the same prompts and settings, not across pipelines. ``None``
  when the pipeline has no ``vae_encoder/``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qcompiler.diffusion import metrics
from qcompiler.diffusion.evaluate import save_grid
from qcompiler.diffusion.pipeline import GenerationSettings, PipelineFolder, generate, load_pipeline

#: The VAE latent is average-pooled to POOL × POOL cells per channel for the Fréchet features.
POOL = 4


def vae_features(folder: PipelineFolder, images: np.ndarray, batch_size: int = 16) -> np.ndarray | None:
    """(N, C·POOL²) pooled VAE-encoder latent means of images (N, 3, H, W) in [-1, 1]; None without an encoder."""
    from qcompiler.runtimes.ort import make_session

    if not folder.vae_encoder_path.is_file():
        return None
    session = make_session(folder.vae_encoder_path)
    name = session.get_inputs()[0].name
    features = []
    for start in range(0, len(images), batch_size):
        moments = session.run(None, {name: np.ascontiguousarray(images[start:start + batch_size], np.float32)})[0]
        mean = moments[:, : moments.shape[1] // 2]  # latent_parameters = [mean; log-variance] on channels
        rows = [np.stack([cell.mean(axis=(-2, -1)) for cell in np.array_split(band, POOL, axis=-1)], -1)
                for band in np.array_split(mean, POOL, axis=-2)]
        features.append(np.stack(rows, -2).reshape(len(mean), -1))
    return np.concatenate(features).astype(np.float64)


def evaluate_pipeline(folder: PipelineFolder, quant_path: str | os.PathLike, prompts: list[str],
                      settings: GenerationSettings = GenerationSettings(), grid: str | os.PathLike | None = None,
                      grid_columns: int = 8, threads: int | None = None) -> dict:
    """Every number of the comparison (module docstring); writes the grid PNG when ``grid`` is given."""
    bar = tqdm(desc="sampling", unit="step", leave=False, disable=None)
    # Both pipelines load before any sampling: a quantized model ORT cannot run fails in seconds.
    float_pipe = load_pipeline(folder, hook=lambda feeds: bar.update(1), threads=threads)
    quant_pipe = load_pipeline(folder, denoiser=quant_path, hook=lambda feeds: bar.update(1), threads=threads)
    settings = settings.resolved(float_pipe)
    bar.total = 2 * -(-len(prompts) // settings.batch_size) * settings.steps
    with bar:
        bar.set_description(f"sampling float {folder.root.name}")
        float_images = generate(float_pipe, prompts, settings)
        bar.set_description(f"sampling {Path(quant_path).name}")
        quant_images = generate(quant_pipe, prompts, settings)
    float_features, quant_features = vae_features(folder, float_images), vae_features(folder, quant_images)
    result = {
        "pipeline": str(folder.root), "quant_model": str(quant_path), "denoiser": folder.denoiser_name,
        "samples": len(prompts), "settings": asdict(settings), "image_shape": list(float_images.shape[1:]),
        "psnr_db": float(np.mean(metrics.psnr_per_image(float_images, quant_images))),
        "psnr_db_all": metrics.psnr(float_images, quant_images),
        "ssim": metrics.ssim(float_images, quant_images),
        "frechet_vae": None if float_features is None else metrics.frechet_distance(quant_features, float_features),
        "frechet_features": f"vae_encoder latent mean, {POOL}x{POOL} average pool" if float_features is not None
        else None,
    }
    if grid is not None:
        n = grid_columns
        result["grid"] = str(save_grid([float_images[:n], quant_images[:n]], grid, ["float", "quantized"],
                                       title=f"{Path(quant_path).parent.name}/{Path(quant_path).name} vs float {folder.root.name}"))
    return result
