"""Quantize an ONNX model: qcompile MODEL --recipe NAME [--calib DIR] [-o OUT]."""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompiler.errors import QCompileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="float ONNX model (external data beside it is read too)")
    parser.add_argument("--recipe", default="minmax", help="recipe name (see `qcompile recipes`) or a .toml file")
    parser.add_argument("--calib", help="calibration folder of .npz files; default: <model stem>.calib/ beside it")
    parser.add_argument("-o", "--output", help="output model; default: ./<stem>.<recipe>.w<W>a<A>.onnx")
    parser.add_argument("--wbits", type=int, choices=(8, 4), help="weight bits (default: the recipe's)")
    parser.add_argument("--abits", type=int, choices=(8, 6, 4), help="activation bits; below 8 is simulated")
    parser.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128), help="int4 weight block size")
    parser.add_argument("--calib-limit", type=int, help="use at most this many calibration samples")
    parser.add_argument("--verify", action="store_true", help="onnx.checker + ORT numerical check after each pass")
    parser.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                        help="also write <out>.after-PASS.onnx (repeatable)")
    parser.add_argument("--groups", type=int, help="DGQ: K groups per activation (default 16 at W8, 8 at W4)")
    parser.add_argument("--target", default="ort", choices=("ort",),
                        help="what the output runs on: ort = ONNX Runtime integer kernels (default)")
    parser.add_argument("--channel-groups", default="affine", choices=("affine", "split", "fold", "simulate"),
                        help="DGQ channel-group lowering: affine = DGQ's codes under one per-tensor grid, the "
                             "affine folded into W and b, one integer GEMM (default); split = K integer GEMMs "
                             "(bit-exact reference); fold = shared zero point, ratios in W; simulate = QDQ "
                             "before float GEMMs")
    parser.add_argument("--per-timestep", action="store_true",
                        help="DGQ: group ranges per calibrated timestep (diffusion; simulated lowering)")
    parser.add_argument("--tdq", action="store_true",
                        help="TDQ: activation ranges from the timestep (an MLP per activation, tabled at every "
                             "timestep; diffusion; simulated lowering); adds the tdq pass to any recipe")
    parser.add_argument("--ptqd", action="store_true",
                        help="PTQD: divide the denoiser output by 1 + k_t and record the residual noise variance "
                             "per timestep for stochastic samplers (diffusion); adds the ptqd pass to any recipe")
    parser.add_argument("--set", action="append", default=[], metavar="PASS.FIELD=VALUE", dest="settings",
                        help="override a pass setting of the recipe, e.g. learned_scales.iterations=200 (repeatable)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--force", action="store_true", help="allow -o to be the input model's own path")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for calibration (default: one per core)")


def default_calibration(model: Path, required: bool = True) -> Path | None:
    """``<model stem>.calib/`` beside the model. Missing: an error if ``required``, else None (the
    compile then checks the model first and the recipe's passes say they need calibration)."""
    folder = model.with_suffix(".calib")
    if not folder.is_dir():
        if not required:
            return None
        raise QCompileError(f"{model}: no calibration data; pass --calib DIR (a folder of .npz files whose "
                            f"keys are the model's input names), or put it in {folder}/")
    return folder


def recipe_settings(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """``--set`` values and the DGQ shorthands, grouped by pass."""
    from qcompiler.recipes import parse_setting

    settings: dict[str, dict[str, object]] = {}
    for text in args.settings:
        pass_name, field, value = parse_setting(text)
        settings.setdefault(pass_name, {})[field] = value
    if args.groups is not None:
        settings.setdefault("dgq_groups", {})["groups"] = args.groups
    if args.per_timestep:
        settings.setdefault("dgq_groups", {})["per_timestep"] = True
    return settings


def run(args: argparse.Namespace) -> int:
    from qcompiler.api import CompileOptions, quantize
    from qcompiler.recipes import get_recipe
    from qcompiler.report import format_summary

    model = Path(args.model)
    recipe = get_recipe(args.recipe)
    if args.tdq:
        recipe = recipe.with_step("tdq", before="insert_activation_qdq")
    if args.ptqd:
        recipe = recipe.with_step("ptqd")
    settings = recipe_settings(args)
    if settings:
        recipe = recipe.with_settings(settings)
    if not model.exists():
        raise QCompileError(f"{model}: model file not found")
    calib = Path(args.calib) if args.calib else default_calibration(model, required=False)
    wbits, abits = args.wbits or recipe.wbits, args.abits or recipe.abits
    output = Path(args.output) if args.output else Path(f"{model.stem}.{recipe.name}.w{wbits}a{abits}.onnx")
    options = CompileOptions(wbits=wbits, abits=abits, block_size=args.block_size, calib_limit=args.calib_limit,
                             verify=args.verify, dump_after=tuple(args.dump_after), progress=not args.quiet,
                             device=args.device, target=args.target, channel_groups=args.channel_groups,
                             force=args.force, threads=args.threads)
    result = quantize(model, recipe, calib, output, options)
    format_summary(result.report)
    print(f"wrote {output} and {output}.report.json")
    return 0
