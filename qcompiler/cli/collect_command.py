"""Timestep-aware calibration data for a denoiser: qcompile collect DENOISER.onnx --prompts N --steps 25 -o DIR.

Runs the float DDIM sampler with classifier-free guidance for N prompts and writes the
denoiser's inputs at every step (both guidance halves) as .npz files with ``__timestep__``,
``__label__`` and ``__step__`` metadata (docs/algorithms.md §4). ``<denoiser stem>.json`` and, for a
text-conditioned denoiser, the text encoder ``<denoiser stem>.text_encoder.onnx`` are read from
beside the model; a class-conditioned one (input ``class_labels``) gets the prompted digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompiler.errors import QCompileError, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("denoiser", help="the float denoiser ONNX (inputs sample, timestep, and encoder_hidden_states "
                        "or class_labels)")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts (images) to sample (default 64)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per denoiser call (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    parser.add_argument("-o", "--output", required=True, help="folder for the .npz files (emptied of .npz first)")


def run(args: argparse.Namespace) -> int:
    for module in ("torch", "diffusers"):  # the DDIM sampler's scheduler and tensors
        require(module, "qcompile collect")
    from qcompiler.diffusion.collect import collect
    from qcompiler.diffusion.sampler import config_for

    if not Path(args.denoiser).is_file():
        raise QCompileError(f"{args.denoiser}: no such model file")
    if args.prompts < 1 or args.steps < 1 or args.batch_size < 1:
        raise QCompileError("--prompts, --steps and --batch-size must be positive")
    config = config_for(args.denoiser, steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    result = collect(args.denoiser, args.output, args.prompts, config, args.seed)
    print(f"wrote {result.files} files ({result.samples} samples, {len(result.timesteps)} timesteps "
          f"{result.timesteps[0]}..{result.timesteps[-1]}) to {result.folder}")
    return 0
