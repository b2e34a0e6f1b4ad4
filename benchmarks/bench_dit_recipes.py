"""The DiT recipes on the zoo's class-conditional DiT: final-image quality, integer kernels and latency vs float.

Rows (one ``bench_diffusion`` run on ``models/dit_mnist.onnx``: same seeds, labels, sampler and measurements):
- main: every ``--recipes`` at every ``--settings`` (default minmax, smoothquant, osplus, dgq, dmq, ptq4dit,
  qdit at W8A8, W6A8 and W4A8);
- ablation: ptq4dit with CSB alone (``salience_balance.spearman=false``: s̃(X) = max over timesteps) and
  ptq4dit balancing every Linear (``roles`` + ``other``: fc2 and the embeddings too, as smoothquant does) at
  every setting; at W4, minmax with the MSE clip search of the int4 weight scales that ptq4dit uses, so
  the weight quantizer's share of a W4 difference is visible; at W4, qdit with one group size (128) for
  every layer and qdit with static ranges.

Writes ``dit_recipes.json``, ``dit_recipes.md`` (with a comparison section computed from the rows) and
``dit_recipes.png`` to ``--out``. Rows are cached in ``--work`` (``dit/rows/*.json``) as in bench_diffusion.

Latency (unless ``--no-latency``): the float model and the main rows, interleaved, ``--runs`` calls each.

Usage: python benchmarks/bench_dit_recipes.py [--settings w8a8 w6a8 w4a8] [--samples 16] [--work build/bench_dit]
       [--rows KEY ...]  (rows measured in parallel processes share --work; a run without --rows assembles them)
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import MODELS, calibration, measure_latency, models_dir, run_model  # noqa: E402
from diffusion_rows import Row  # noqa: E402

CLIP = ("--set", "quantize_weights.clip_search=true")
RECIPES = ("minmax", "smoothquant", "osplus", "dgq", "dmq", "ptq4dit", "qdit")
ALL_ROLES = ("--set", 'salience_balance.roles=["modulated", "attention_output", "other"]')


def _recipes() -> list[str]:
    from qcompiler.recipes import available_recipes

    return [name for name in RECIPES if name in available_recipes()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["w8a8", "w6a8", "w4a8"])
    parser.add_argument("--recipes", nargs="+", default=None, help="default: " + " ".join(RECIPES))
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--check-samples", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--latency-batch", type=int, default=None,
                        help="time calls on the first N samples of the calibration batch (default: all 32)")
    parser.add_argument("--cached-only", action="store_true", help="only the rows already measured in --work")
    parser.add_argument("--rows", nargs="+", default=None, metavar="KEY",
                        help="only these row keys (e.g. qdit.w4a8 qdit-static.w4a8): to measure rows in parallel "
                             "processes sharing --work; a final run without it assembles every cached row")
    parser.add_argument("--work", type=Path, default=Path("build/bench_dit"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def rows_for(settings: list[str], recipes: list[str], ablation: bool) -> list[Row]:
    bits = [(int(s[1]), int(s[3])) for s in settings]
    rows = [Row(recipe, w, a) for w, a in bits for recipe in recipes]
    if not ablation:
        return rows
    rows += [Row("ptq4dit", w, a, "csb-only", ("--set", "salience_balance.spearman=false")) for w, a in bits]
    rows += [Row("ptq4dit", w, a, "all-layers", ALL_ROLES) for w, a in bits]  # fc2 and the rest balanced too
    rows += [Row("minmax", w, a, "clip-search", CLIP) for w, a in bits if w < 8]
    if "qdit" in recipes:
        from qdit_rows import qdit_variants

        rows += qdit_variants([(w, a) for w, a in bits if w < 8])  # the setting Q-DiT targets
    return rows


def _psnr(results: list[dict], recipe: str, setting: str, variant: str = "") -> float | None:
    return next((r["psnr_db"] for r in results if r.get("recipe") == recipe and r.get("setting") == setting
                 and r.get("variant", "") == variant and "psnr_db" in r), None)


def comparisons(results: list[dict]) -> str:
    """Final-image PSNR differences between the rows that the DiT recipes are judged by."""
    pairs = [("ptq4dit", "", "smoothquant", ""), ("ptq4dit", "", "minmax", ""),
             ("ptq4dit", "", "ptq4dit", "csb-only"),
             ("ptq4dit", "all-layers", "smoothquant", ""), ("ptq4dit", "all-layers", "ptq4dit", ""), ("ptq4dit", "", "smoothquant", "clip-search"),
             ("ptq4dit", "", "minmax", "clip-search"), ("qdit", "", "ptq4dit", ""), ("qdit", "", "minmax", ""), ("ptq4dit", "", "osplus", ""),
             ("qdit", "", "qdit", "uniform-128"), ("qdit", "", "qdit", "static")]
    lines = ["## Comparisons (final-image PSNR vs float, dB; from the rows above)", "",
             "| setting | row | vs row | Δ PSNR dB |", "|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in results if r.get("setting") != "float"):
        for recipe, variant, other, other_variant in pairs:
            a, b = _psnr(results, recipe, setting, variant), _psnr(results, other, setting, other_variant)
            if a is not None and b is not None:
                name = lambda r, v: f"{r} {v}".strip()  # noqa: E731
                lines.append(f"| {setting} | {name(recipe, variant)} | {name(other, other_variant)} | {a - b:+.2f} |")
    lines += ["", "Per setting, the best main row other than the named recipe:", "",
              "| setting | row | PSNR dB | best other main row | its PSNR dB | Δ dB |", "|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in results if r.get("setting") != "float"):
        main = {r["recipe"]: r["psnr_db"] for r in results
                if r.get("setting") == setting and not r.get("variant") and "psnr_db" in r}
        for recipe in ("ptq4dit", "qdit"):
            others = {k: v for k, v in main.items() if k != recipe}
            if recipe in main and others:
                best = max(others, key=others.get)
                lines.append(f"| {setting} | {recipe} | {main[recipe]:.2f} | {best} | {others[best]:.2f} "
                             f"| {main[recipe] - others[best]:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from diffusion_tables import write_outputs

    args = parse_args(argv)
    args.recipes = args.recipes or _recipes()
    rows = rows_for(args.settings, args.recipes, not args.no_ablation)
    if args.rows:
        by_key = {row.key(): row for row in rows}
        rows = [by_key[key] for key in args.rows if key in by_key]  # in the order given
    if args.cached_only:
        rows = [row for row in rows if (args.work / "dit" / "rows" / f"{row.key()}.s{args.samples}.json").exists()]
    latency, args.no_latency = not args.no_latency, True
    results = run_model("dit", args, rows)
    if latency:  # the float model and the main rows only (ablations share their kernels), interleaved
        main_rows = [r for r in results if "deployed" in r and not r.get("variant")]  # the float row first
        measure_latency(main_rows, models_dir() / f"{MODELS['dit']}.onnx", calibration(MODELS["dit"], args.work / "dit"), args.runs,
                        args.latency_batch)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "samples": args.samples, "steps": 25, "guidance": 4.0}
    write_outputs(results, meta, args.out, name="dit_recipes")
    path = args.out / "dit_recipes.md"
    notes = args.out / "dit_recipes.notes.md"  # the hand-written reading of the measured rows, kept across runs
    path.write_text(path.read_text() + "\n" + comparisons(results) + ("\n" + notes.read_text() if notes.exists() else ""))
    print(comparisons(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
