"""Outlier analysis of a float model: qcompile inspect MODEL --calib DIR [--json OUT] [--plots DIR] [--tau 64].

Activation outliers (|h| > τ·mean|h|) by layer, channel, token and token id, with the channels
that recur across layers; weight max/mean per row and column; attention mass per key; DGQ's
D_channel/D_pixel; and a per-layer treatment with the recipe it maps to.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from qcompiler.errors import QCompileError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="float ONNX model (external data beside it is read too)")
    parser.add_argument("--calib", help="calibration folder of .npz files; default: <model stem>.calib/ beside it")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--plots", help="write PNG plots into this folder")
    parser.add_argument("--tau", type=float, default=64.0, help="outlier threshold factor: |h| > tau * mean|h|")
    parser.add_argument("--attention-fraction", type=float, default=0.1,
                        help="attention outlier key: mass summed over queries >= this * sequence length")
    parser.add_argument("--abits", type=int, default=8, help="activation bits the advice assumes")
    parser.add_argument("--wbits", type=int, default=8, help="weight bits the advice assumes")
    parser.add_argument("--groups", type=int, default=8, help="DGQ group count K for the group estimate")
    parser.add_argument("--token-input", default="input_ids",
                        help="integer (batch, tokens) input whose ids outliers are counted by ('' for none)")
    parser.add_argument("--calib-limit", type=int, help="use at most this many calibration samples")


def run(args: argparse.Namespace) -> int:
    from qcompiler.cli.compile_command import default_calibration
    from qcompiler.inspect import InspectConfig, inspect_model
    from qcompiler.inspect.plots import write_plots
    from qcompiler.inspect.report import make_console, print_summary, write_json

    model = Path(args.model)
    if not model.exists():
        raise QCompileError(f"{model}: model file not found")
    calib = Path(args.calib) if args.calib else default_calibration(model)
    config = InspectConfig(tau=args.tau, attention_fraction=args.attention_fraction, abits=args.abits,
                           wbits=args.wbits, groups=args.groups, token_input=args.token_input or None,
                           calib_limit=args.calib_limit, progress=not args.quiet)
    result = inspect_model(model, calib, config)
    console = make_console()
    if not args.quiet:
        print_summary(result.report, console)
    if args.plots:
        with console.status("writing plots", spinner="dots") if not args.quiet else nullcontext():
            written = write_plots(result.report, result.stats, args.plots)
        result.report["plots"] = [str(path) for path in written]
        console.print(f"wrote {len(written)} plots to {args.plots}: " + ", ".join(p.name for p in written))
    if args.json:
        console.print(f"wrote {write_json(result.report, args.json)}")
    return 0

