"""Float vs quantized denoiser on images: qcompile eval-diffusion PIPELINE_DIR|FLOAT.onnx QUANT [--prompts FILE|N] [--grid PNG] [--json OUT].

On a pipeline folder: runs the pipeline (optimum's ONNX Runtime classes, its own scheduler,
text encoder and guidance) twice from the same seeds, once with its float denoiser and once
with QUANT (a quantized denoiser ONNX, or a pipeline folder that `qcompile PIPELINE_DIR`
wrote) in its place, and reports PSNR and SSIM of the quantized images vs the float ones and
a Fréchet distance between the two image sets in the pipeline's own VAE-encoder latent space.

On a bare float denoiser ONNX with its JSON (the zoo's DiT, or its UNet outside its pipeline
folder): the DDIM sampler with the JSON's prompts (--samples N); also the accuracy of the
classifier the JSON names (the zoo's MNIST classifier) and the Fréchet distance to the real
held-out images beside it, in its feature space.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qcompiler.errors import QCompileError, require

DENOISER_STEPS, DENOISER_GUIDANCE = 25, 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("float_model", help="a pipeline folder, or a bare float denoiser ONNX (its text encoder and "
                        "JSON beside it)")
    parser.add_argument("quant_model", help="the quantized denoiser ONNX (or, with a pipeline, a quantized pipeline "
                        "folder)")
    parser.add_argument("--prompts", help="pipelines: a text file with one prompt per line, or a number of built-in "
                        "prompts (default 16)")
    parser.add_argument("--samples", type=int, default=64, help="bare denoisers: images per model (default 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's own; bare denoiser 25)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's "
                        "own; bare denoiser 4)")
    parser.add_argument("--height", type=int, help="image height (pipelines; default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (pipelines; default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (pipelines; default 4)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM η: 0 deterministic (default), 1 DDPM's variance; with η > 0 a PTQD model's "
                             "residual variance is taken out of the step noise")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    parser.add_argument("--classifier", help="bare denoisers: the classifier ONNX (logits, features) scoring the "
                        "images (default: the one the float denoiser's JSON names; the zoo's MNIST classifier)")
    parser.add_argument("--grid", help="write a PNG grid: float rows above quantized rows")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--cache", help="bare denoisers: folder caching the float model's images across runs (default: none)")


def _write_json(result: dict, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(result, indent=2))
    os.replace(staging, path)


def run(args: argparse.Namespace) -> int:
    for flag in ("steps", "height", "width", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise QCompileError(f"--{flag.replace('_', '-')} must be positive")
    if Path(args.float_model).is_dir():
        result = _run_pipeline(args)
    else:
        result = _run_denoiser(args)
    if args.grid:
        print(f"wrote {result['grid']}")
    if args.json:
        _write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def _quant_denoiser(path: Path) -> Path:
    """QUANT as a model file: itself, or the same denoiser path inside a quantized pipeline folder."""
    from qcompiler.diffusion.pipeline import open_pipeline

    if path.is_dir():
        return open_pipeline(path).denoiser_path
    if not path.is_file():
        raise QCompileError(f"{path}: no such model file")
    return path


def _run_pipeline(args: argparse.Namespace) -> dict:
    from qcompiler.diffusion.pipeline import GenerationSettings, open_pipeline
    from qcompiler.diffusion.prompts import prompts_from

    folder = open_pipeline(args.float_model)
    quant = _quant_denoiser(Path(args.quant_model))
    prompts = prompts_from(args.prompts or "16", folder.root)
    if len(prompts) < 2:
        raise QCompileError("eval-diffusion needs at least 2 prompts (the Fréchet distance needs a covariance)")
    for module in ("torch", "diffusers", "optimum.onnxruntime"):
        require(module, "qcompile eval-diffusion on a pipeline")
    from qcompiler.diffusion.pipeline_eval import evaluate_pipeline

    settings = GenerationSettings(steps=args.steps, guidance_scale=args.guidance, height=args.height,
                                  width=args.width, batch_size=args.batch_size, seed=args.seed)
    result = evaluate_pipeline(folder, quant, prompts, settings, grid=args.grid)
    s = result["settings"]
    print(f"{quant} in {folder.root}: {result['samples']} images {s['height']}x{s['width']}, {s['steps']} steps, "
          f"guidance {s['guidance_scale']}")
    print(f"  PSNR {result['psnr_db']:.2f} dB (all pixels {result['psnr_db_all']:.2f} dB), SSIM {result['ssim']:.4f}")
    if result["frechet_vae"] is not None:
        print(f"  Fréchet distance quant vs float ({result['frechet_features']}): {result['frechet_vae']:.4f}")
    return result


def _run_denoiser(args: argparse.Namespace) -> dict:
    for module in ("torch", "diffusers"):  # the DDIM sampler's scheduler and tensors
        require(module, "qcompile eval-diffusion")
    from qcompiler.diffusion.evaluate import DiffusionEvalOptions, evaluate_diffusion

    for path in (args.float_model, args.quant_model):
        if not Path(path).is_file():
            raise QCompileError(f"{path}: no such model file")
    if args.prompts is not None:  # a bare denoiser's prompts are its JSON's: only a count applies
        if not str(args.prompts).isdigit():
            raise QCompileError(f"{args.prompts}: a bare denoiser takes --prompts N (or --samples N); prompt files "
                                "need a pipeline folder")
        args.samples = int(args.prompts)
    if args.samples < 2:
        raise QCompileError("--samples must be at least 2 (the Fréchet distance needs a covariance)")
    if args.eta < 0:
        raise QCompileError(f"--eta must be ≥ 0, got {args.eta}")
    options = DiffusionEvalOptions(samples=args.samples, steps=args.steps or DENOISER_STEPS,
                                   guidance_scale=DENOISER_GUIDANCE if args.guidance is None else args.guidance, eta=args.eta,
                                   seed=args.seed, classifier=args.classifier, cache=args.cache)
    try:
        result = evaluate_diffusion(args.float_model, args.quant_model, options, grid=args.grid)
    except FileNotFoundError as exc:
        raise QCompileError(str(exc)) from None
    print(f"{args.quant_model} vs {args.float_model}: {result['samples']} images, {result['steps']} DDIM steps, "
          f"guidance {result['guidance_scale']}")
    print(f"  PSNR {result['psnr_db']:.2f} dB (all pixels {result['psnr_db_all']:.2f} dB), SSIM {result['ssim']:.4f}")
    for name in ("float", "quant"):
        print(f"  {name:5s}: accuracy {result['accuracy'][name]:.3f}, Fréchet distance {result['frechet'][name]:.3f}")
    print(f"  Fréchet distance quant vs float {result['frechet_quant_vs_float']:.3f}")
    return result
