"""Timestep-aware calibration data for a denoiser: qcompile collect PIPELINE_DIR|DENOISER.onnx --prompts FILE|N -o DIR.

On a pipeline folder (what `optimum-cli export onnx --task text-to-image` writes): runs the
pipeline through optimum's ONNX Runtime classes with its own scheduler, text encoder, guidance
and step count (--steps, --guidance, --height/--width override them) and records the
denoiser's feeds at every step, both guidance halves, as .npz files with ``__timestep__``,
``__step__`` and ``__prompt__`` metadata; --max-files bounds the disk use, spread uniformly over
the steps. --prompts is a text file (one prompt per line) or a number of built-in prompts.

On a bare denoiser ONNX (the zoo's DiT, or its UNet outside its pipeline folder): the DDIM
sampler with the prompts, scheduler and tokenizer vocabulary or class names of ``<stem>.json``
and the text encoder ``<stem>.text_encoder.onnx`` beside the model (--prompts N: its first N
prompts; docs/diffusion.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompiler.errors import QCompileError, require

DENOISER_STEPS, DENOISER_GUIDANCE, DENOISER_BATCH, PIPELINE_BATCH = 25, 4.0, 16, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("denoiser", help="a pipeline folder (model_index.json, unet/ or transformer/, ...) or a "
                        "bare denoiser ONNX with its JSON (inputs sample, timestep, and encoder_hidden_states or class_labels)")
    parser.add_argument("--prompts", default="64", help="a text file with one prompt per line, or a number of "
                        "built-in prompts (default 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's own; bare denoiser 25)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's "
                        "own; bare denoiser 4)")
    parser.add_argument("--height", type=int, help="image height in pixels (pipelines; default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width in pixels (pipelines; default: the pipeline's)")
    parser.add_argument("--max-files", type=int, help="write at most this many files, spread uniformly over the "
                        "steps (pipelines; default: every step of every batch)")
    parser.add_argument("--batch-size", type=int, help=f"prompts per denoiser call (default {PIPELINE_BATCH} for a "
                        f"pipeline, {DENOISER_BATCH} for a bare denoiser)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    parser.add_argument("-o", "--output", required=True, help="folder for the .npz files (emptied of .npz first)")


def _check_positive(args: argparse.Namespace) -> None:
    for flag in ("steps", "batch_size", "max_files", "height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise QCompileError(f"--{flag.replace('_', '-')} must be positive")


def run(args: argparse.Namespace) -> int:
    _check_positive(args)
    if Path(args.denoiser).is_dir():
        return _run_pipeline(args)
    return _run_denoiser(args)


def _run_pipeline(args: argparse.Namespace) -> int:
    from qcompiler.diffusion.pipeline import GenerationSettings, open_pipeline
    from qcompiler.diffusion.prompts import prompts_from

    folder = open_pipeline(args.denoiser)  # checked before anything is loaded or written
    prompts = prompts_from(args.prompts, folder.root)
    for module in ("torch", "diffusers", "optimum.onnxruntime"):
        require(module, "qcompile collect on a pipeline")
    from qcompiler.diffusion.pipeline_collect import collect_pipeline

    settings = GenerationSettings(steps=args.steps, guidance_scale=args.guidance, height=args.height,
                                  width=args.width, batch_size=args.batch_size or PIPELINE_BATCH, seed=args.seed)
    result = collect_pipeline(folder, args.output, prompts, settings, args.max_files)
    s = result.settings
    print(f"wrote {result.files} files ({result.samples} samples, {len(result.timesteps)} timesteps "
          f"{result.timesteps[0]}..{result.timesteps[-1]}; {len(prompts)} prompts, {s.steps} steps, guidance "
          f"{s.guidance_scale}, {s.height}x{s.width}) to {result.folder}")
    return 0


def _run_denoiser(args: argparse.Namespace) -> int:
    for module in ("torch", "diffusers"):  # the DDIM sampler's scheduler and tensors
        require(module, "qcompile collect")
    if not Path(args.denoiser).is_file():
        raise QCompileError(f"{args.denoiser}: no such model file or pipeline folder")
    if not str(args.prompts).isdigit() or int(args.prompts) < 1:
        raise QCompileError(f"{args.prompts}: a bare denoiser takes --prompts N (the first N of its JSON's prompts); prompt files "
                            "need a pipeline folder")
    if args.max_files is not None or args.height is not None or args.width is not None:
        raise QCompileError("--max-files, --height and --width apply to a pipeline folder, not to "
                            f"{args.denoiser}")
    from qcompiler.diffusion.collect import collect
    from qcompiler.diffusion.sampler import config_for

    config = config_for(args.denoiser, steps=args.steps or DENOISER_STEPS,
                        guidance_scale=DENOISER_GUIDANCE if args.guidance is None else args.guidance,
                        batch_size=args.batch_size or DENOISER_BATCH)
    result = collect(args.denoiser, args.output, int(args.prompts), config, args.seed)
    print(f"wrote {result.files} files ({result.samples} samples, {len(result.timesteps)} timesteps "
          f"{result.timesteps[0]}..{result.timesteps[-1]}) to {result.folder}")
    return 0
