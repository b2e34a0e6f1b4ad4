"""Paired final-image PSNR differences between compiled diffusion models, with their standard errors.

A difference of two rows' mean PSNR over 16 images can be a few tenths of a dB either way by chance:
one image's PSNR swings by dBs between nearly equal models, because the sampler chains 25 steps.
This script samples every ``--models`` entry from the same seeds and prompts as the float model
(``qcompile eval-diffusion``'s ``evaluate_diffusion``, float images cached), and reports, for each
``--pairs A:B``, the mean per-image difference PSNR_A − PSNR_B, its standard error and how many
images A wins: a pair reads as a win only where the difference exceeds two standard errors.

Usage: python benchmarks/paired_psnr.py --float models/dit_mnist.onnx --samples 64 --name dit_paired \
       --models ptq4dit=build/bench_dit/dit/ptq4dit.w8a8.onnx smoothquant=build/.../smoothquant.w8a8.onnx \
       --pairs ptq4dit:smoothquant
Writes ``NAME.json`` and ``NAME.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float", dest="float_model", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--pairs", nargs="+", required=True, metavar="A:B")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--cache", type=Path, default=Path("build/paired_psnr_cache"))
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="earlier runs' JSON: models with the same path, float model and settings are read back")
    parser.add_argument("--name", default="paired_psnr")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.models = dict(item.split("=", 1) for item in args.models)
    args.pairs = [tuple(item.split(":", 1)) for item in args.pairs]
    missing = sorted({m for pair in args.pairs for m in pair} - set(args.models))
    if missing:
        parser.error(f"--pairs name models not in --models: {', '.join(missing)}")
    return args


def paired(values: list[float], reference: list[float]) -> dict:
    """Mean, standard error (``bench_lowering.paired_standard_error``) and wins of the per-image difference."""
    from bench_lowering import paired_standard_error

    diff = np.asarray(values) - np.asarray(reference)
    return {"mean_db": float(diff.mean()), "se_db": paired_standard_error(values, reference),
            "wins": int((diff > 0).sum()), "images": int(diff.size)}


def verdict(stats: dict) -> str:
    if stats["mean_db"] > 2 * stats["se_db"]:
        return "A better"
    if stats["mean_db"] < -2 * stats["se_db"]:
        return "B better"
    return "within 2 SE"


def main(argv=None) -> int:
    from qcompiler.diffusion.evaluate import DiffusionEvalOptions, evaluate_diffusion

    args = parse_args(argv)
    options = DiffusionEvalOptions(samples=args.samples, steps=args.steps, guidance_scale=args.guidance,
                                   cache=str(args.cache))
    rows = {}
    settings = {"float": str(args.float_model), "samples": args.samples, "steps": args.steps, "guidance": args.guidance}
    for earlier in args.reuse:
        data = json.loads(earlier.read_text())
        if {k: data["meta"][k] for k in settings} == settings:
            rows.update({label: row for label, row in data["rows"].items()
                         if args.models.get(label) == row["path"]})
    for label, path in args.models.items():
        if label in rows:
            print(f"[paired] {label}: {rows[label]['psnr_db']:.2f} dB (read back)", flush=True)
            continue
        started = time.perf_counter()
        result = evaluate_diffusion(args.float_model, path, options)
        rows[label] = {"path": path, "psnr_db": result["psnr_db"], "ssim": result["ssim"],
                       "psnr_db_per_image": result["psnr_db_per_image"]}
        print(f"[paired] {label}: {result['psnr_db']:.2f} dB ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = {label: rows[label] for label in args.models}  # in the order given
    pairs = [{"a": a, "b": b, **paired(rows[a]["psnr_db_per_image"], rows[b]["psnr_db_per_image"])}
             for a, b in args.pairs]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
            "float": str(args.float_model), "samples": args.samples, "steps": args.steps, "guidance": args.guidance}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "pairs": pairs}, indent=1))
    lines = [f"# Paired final-image PSNR ({meta['date']})", "", f"`{meta['command']}`: {args.samples} images "
             f"(seeds 0..{args.samples - 1}), DDIM {args.steps} steps, guidance {args.guidance}; PSNR of each "
             "model's final images vs the float model's from the same seed and prompt.", "",
             "| model | PSNR dB | SSIM |", "|---|---:|---:|"]
    lines += [f"| {label} | {row['psnr_db']:.2f} | {row['ssim']:.4f} |" for label, row in rows.items()]
    lines += ["", "| A | B | mean PSNR_A − PSNR_B dB | SE dB | images A wins | reading |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['mean_db']:+.2f} | {p['se_db']:.2f} | {p['wins']}/{p['images']} "
              f"| {verdict(p)} |" for p in pairs]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
