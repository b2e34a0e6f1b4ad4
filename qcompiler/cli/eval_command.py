"""Error of a quantized model vs its float original: qcompile eval FLOAT QUANT --calib DIR [--json OUT]."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("float_model", help="the float ONNX model")
    parser.add_argument("quant_model", help="the quantized ONNX model")
    parser.add_argument("--calib", "--data", dest="data", required=True, metavar="DIR",
                        help="folder of .npz files (model input names as keys), ideally held out from the "
                             "compile's calibration; --data is the old name")
    parser.add_argument("--json", help="write every number to this JSON file")
    parser.add_argument("--limit", type=int, help="use at most this many samples")
    parser.add_argument("--worst", type=int, default=10, help="how many worst layers to print")
    parser.add_argument("--include-padding", action="store_true",
                        help="count positions where the attention_mask input is 0 (left out by default: "
                             "their outputs are masked by every consumer)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from qcompiler.evaluate import EvalOptions, evaluate

    result = evaluate(args.float_model, args.quant_model, args.data,
                      EvalOptions(limit=args.limit, progress=not args.quiet,
                                  mask_input=None if args.include_padding else "attention_mask"))
    console = Console(width=110)
    padding = (f"; positions where {result['padding_excluded_by']} = 0 left out"
               if result.get("padding_excluded_by") else "")
    table = Table(title=f"{args.quant_model} vs {args.float_model} ({result['samples']} samples{padding})")
    for column in ("output", "SQNR dB", "cosine", "max abs err"):
        table.add_column(column, justify="left" if column == "output" else "right")
    rows = list(result["outputs"].items()) + [("overall", result["overall"])]
    for name, metrics in rows:
        table.add_row(name, f"{metrics['sqnr_db']:.2f}", f"{metrics['cosine']:.5f}", f"{metrics['max_abs_error']:.4g}")
    console.print(table)
    if result.get("per_layer"):
        layers = Table(title=f"worst {args.worst} quantized layers (output SQNR vs float)")
        layers.add_column("tensor")
        layers.add_column("SQNR dB", justify="right")
        for row in result["per_layer"][: args.worst]:
            layers.add_row(row["tensor"], f"{row['sqnr_db']:.2f}")
        console.print(layers)
    if args.json:
        path = Path(args.json)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(result, indent=2))
        os.replace(staging, path)
        print(f"wrote {path}")
    return 0
