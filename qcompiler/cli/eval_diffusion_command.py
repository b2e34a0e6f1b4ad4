"""Float vs quantized denoiser on images: qcompile eval-diffusion FLOAT QUANT [--samples N] [--grid PNG] [--json OUT].

Samples the same prompts and seeds with both denoisers (DDIM + classifier-free guidance on
ONNX Runtime, the float model's text encoder for both) and reports PSNR and SSIM of the
quantized images vs the float ones, the MNIST classifier's accuracy for the prompted digit,
and the Fréchet distance to real held-out digits in the classifier's feature space.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from qcompiler.errors import QCompileError, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("float_model", help="the float denoiser ONNX (its text encoder and JSON sit beside it)")
    parser.add_argument("quant_model", help="the quantized denoiser ONNX")
    parser.add_argument("--samples", type=int, default=64, help="images per model (default 64)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM η: 0 deterministic (default), 1 DDPM's variance; with η > 0 a PTQD model's "
                             "residual variance is taken out of the step noise")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    parser.add_argument("--classifier", help="MNIST classifier ONNX (default: the bundled one)")
    parser.add_argument("--grid", help="write a PNG grid: float rows above quantized rows")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--cache", help="folder caching the float model's images across runs (default: none)")


def _write_json(result: dict, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(result, indent=2))
    os.replace(staging, path)


def run(args: argparse.Namespace) -> int:
    for module in ("torch", "diffusers"):  # the DDIM sampler's scheduler and tensors
        require(module, "qcompile eval-diffusion")
    from qcompiler.diffusion.evaluate import DiffusionEvalOptions, evaluate_diffusion

    for path in (args.float_model, args.quant_model):
        if not Path(path).is_file():
            raise QCompileError(f"{path}: no such model file")
    if args.samples < 2:
        raise QCompileError("--samples must be at least 2 (the Fréchet distance needs a covariance)")
    if args.eta < 0:
        raise QCompileError(f"--eta must be ≥ 0, got {args.eta}")
    options = DiffusionEvalOptions(samples=args.samples, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
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
    if args.grid:
        print(f"wrote {result['grid']}")
    if args.json:
        _write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0
