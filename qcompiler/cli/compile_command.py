"""Quantize an ONNX model: qcompile MODEL|PIPELINE_DIR --recipe NAME [--calib DIR] [-o OUT].

A pipeline folder (optimum's ONNX export of a diffusers pipeline) has its denoiser quantized;
the output is a complete pipeline folder that optimum loads unchanged (docs/diffusion.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qcompiler.errors import QCompileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="float ONNX model (external data beside it is read too), or a diffusion "
                        "pipeline folder whose denoiser is quantized")
    parser.add_argument("--recipe", default="minmax", help="recipe name (see `qcompile recipes`) or a .toml file")
    parser.add_argument("--calib", help="calibration folder of .npz files; default: <model stem>.calib/ (a "
                        "pipeline: <folder>.calib/) beside it")
    parser.add_argument("-o", "--output", help="output model; default: ./<stem>.<recipe>.w<W>a<A>.onnx (a pipeline: "
                        "the folder ./<name>.<recipe>.w<W>a<A>/)")
    parser.add_argument("--wbits", type=int, choices=(8, 6, 4),
                        help="weight bits (default: the recipe's; 6: int6 values in int8 containers)")
    parser.add_argument("--w8-budget", type=parse_share, metavar="SHARE",
                        help="mixed precision: keep the weights the output is most sensitive to at 8 bits, at most "
                             "this share of the weight bytes (e.g. 10%%; with --wbits 4); adds the mixed_precision pass")
    parser.add_argument("--abits", type=int, choices=(8, 6, 4), help="activation bits; below 8 is simulated")
    parser.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128), help="int4 weight block size")
    parser.add_argument("--calib-limit", type=int, help="use at most this many calibration samples")
    parser.add_argument("--verify", action="store_true", help="onnx.checker + ORT numerical check after each pass")
    parser.add_argument("--dump-after", action="append", default=[], metavar="PASS",
                        help="also write <out>.after-PASS.onnx (repeatable)")
    parser.add_argument("--groups", type=int, help="DGQ: K groups per activation (default 16 at W8, 8 at W4)")
    parser.add_argument("--target", default="ort", choices=("ort", "tensorrt"),
                        help="what the output runs on: ort = ONNX Runtime integer kernels (default); tensorrt = "
                             "TensorRT explicit quantization (symmetric int8 Q/DQ, int4 blocked DQ at opset 21)")
    parser.add_argument("--channel-groups", default="affine", choices=("affine", "split", "fold", "simulate"),
                        help="DGQ channel-group lowering: affine = DGQ's codes under one per-tensor grid, the "
                             "affine folded into W and b, one integer GEMM (default); split = K integer GEMMs "
                             "(bit-exact reference); fold = shared zero point, ratios in W; simulate = QDQ "
                             "before float GEMMs")
    parser.add_argument("--bias-correction", default="on", choices=("on", "off"),
                        help="DGQ affine lowering: subtract the calibrated mean of the re-quantized weight's "
                             "error from the bias (default on; off keeps the bias exact to DGQ's codes)")
    parser.add_argument("--dynamic-groups", default="integer", choices=("integer", "simulate"),
                        help="qdit group lowering: integer = one integer GEMM (MatMulIntegerToFloat) per Linear, run-time per-token, "
                             "per-group scales on its int32 sums (default); simulate = fake-quantized float GEMMs")
    parser.add_argument("--int4-storage", default="packed", choices=("packed", "container"),
                        help="ORT target, int4 Conv/Gemm weights (run on int8 kernels): packed = ONNX INT4 in the file, "
                             "unpacked by ORT when the session loads (default; opset 21); container = int8 in the file")
    parser.add_argument("--per-timestep", action="store_true",
                        help="DGQ: group ranges per calibrated timestep (diffusion)")
    parser.add_argument("--tdq", action="store_true",
                        help="TDQ: activation ranges from the timestep (an MLP per activation, tabled at every "
                             "timestep; diffusion); adds the tdq pass to any recipe")
    parser.add_argument("--timestep-groups", default="auto", choices=("auto", "integer", "simulate"),
                        help="ORT target, per-timestep and TDQ ranges: integer = integer GEMMs (one per channel "
                             "group; ConvInteger for Convs) whose int32 sums the timestep's gathered scales rescale; "
                             "simulate = fake quantization with the gathered scales before float GEMMs; auto = integer "
                             "where that is faster on ORT's CPU (MatMul/Gemm of >= 96 input channels with one group or token "
                             "groups), else "
                             "simulated (default)")
    parser.add_argument("--ptqd", action="store_true",
                        help="PTQD: divide the denoiser output by 1 + k_t and record the residual noise variance "
                             "per timestep for stochastic samplers (diffusion); adds the ptqd pass to any recipe")
    parser.add_argument("--set", action="append", default=[], metavar="PASS.FIELD=VALUE", dest="settings",
                        help="override a pass setting of the recipe, e.g. learned_scales.iterations=200 (repeatable)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--force", action="store_true", help="allow -o to be the input model's own path")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for calibration (default: one per core)")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--cluster", metavar="ADDRESS",
                         help="calibrate on an existing dask.distributed scheduler (e.g. tcp://host:8786): shards "
                              "of the calibration files run on its workers, merged to the single-process result")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="calibrate on a local dask cluster of N worker processes (same result as without)")
    parser.add_argument("--shared-dir", metavar="DIR",
                        help="with --cluster: a folder every worker can read, where the current graph is written "
                             "for them (default: a temporary folder, visible to workers on this machine only)")


def parse_share(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1; argparse reports a ValueError as a usage error (exit code 2)."""
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


parse_share.__name__ = "share in [0%, 100%)"  # argparse names the type in its error message


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


def cluster_config(args: argparse.Namespace):
    """The ``ClusterConfig`` of ``--cluster``/``--workers``/``--shared-dir``; None to calibrate in this process."""
    from qcompiler.calibration.distributed import ClusterConfig

    if args.cluster is None and args.workers is None:
        if args.shared_dir is not None:
            raise QCompileError("--shared-dir is for a calibration cluster; add --cluster ADDRESS or --workers N")
        return None
    return ClusterConfig(address=args.cluster, workers=args.workers, shared_dir=args.shared_dir)


def run(args: argparse.Namespace) -> int:
    from qcompiler.api import CompileOptions, quantize
    from qcompiler.recipes import get_recipe, with_mixed_precision
    from qcompiler.report import format_summary

    model = Path(args.model)
    recipe = get_recipe(args.recipe)
    if args.tdq:
        recipe = recipe.with_step("tdq", before="insert_activation_qdq")
    if args.ptqd:
        recipe = recipe.with_step("ptqd")
    settings = recipe_settings(args)
    mixed = settings.pop("mixed_precision", None)
    if settings:
        recipe = recipe.with_settings(settings)
    if args.w8_budget is not None:  # after --set, so it copies the quantize_weights config that will run
        recipe = with_mixed_precision(recipe, args.w8_budget)
    if mixed:
        recipe = recipe.with_settings({"mixed_precision": mixed})
    if not model.exists():
        raise QCompileError(f"{model}: model file not found")
    pipeline = _pipeline(model)
    if pipeline is not None:
        calib = Path(args.calib) if args.calib else pipeline_calibration(pipeline)
    else:
        calib = Path(args.calib) if args.calib else default_calibration(model, required=False)
    wbits, abits = args.wbits or recipe.wbits, args.abits or recipe.abits
    stem = model.name if pipeline is not None else model.stem
    output = (Path(args.output) if args.output else
              Path(f"{stem}.{recipe.name}.w{wbits}a{abits}" + ("" if pipeline is not None else ".onnx")))
    options = CompileOptions(wbits=wbits, abits=abits, block_size=args.block_size, calib_limit=args.calib_limit,
                             verify=args.verify, dump_after=tuple(args.dump_after), progress=not args.quiet,
                             device=args.device, target=args.target, channel_groups=args.channel_groups,
                             dynamic_groups=args.dynamic_groups, bias_correction=args.bias_correction == "on",
                             int4_storage=args.int4_storage, timestep_groups=args.timestep_groups,
                             force=args.force, threads=args.threads, cluster=cluster_config(args))
    if pipeline is not None:
        from qcompiler.diffusion.pipeline_compile import REPORT_NAME, compile_pipeline

        result = compile_pipeline(pipeline, recipe, calib, output, options)
        format_summary(result.report)
        print(f"wrote pipeline {output}/ (quantized {pipeline.denoiser_name}/model.onnx, report {REPORT_NAME})")
        return 0
    result = quantize(model, recipe, calib, output, options)
    format_summary(result.report)
    print(f"wrote {output} and {output}.report.json")
    return 0


def _pipeline(model: Path):
    """The checked PipelineFolder when ``model`` is a folder, else None."""
    if not model.is_dir():
        return None
    from qcompiler.diffusion.pipeline import open_pipeline

    return open_pipeline(model)


def pipeline_calibration(pipeline) -> Path:
    """``<pipeline>.calib/`` beside the folder, or an error saying how to make it."""
    from qcompiler.diffusion.pipeline_compile import default_calibration as pipeline_default

    calib = pipeline_default(pipeline)
    if calib is None:
        raise QCompileError(f"{pipeline.root}: no calibration data; run `qcompile collect {pipeline.root} --prompts N "
                            f"-o {pipeline.root.name}.calib` beside it, or pass --calib DIR")
    return calib
