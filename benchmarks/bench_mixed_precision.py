"""Benchmark ``--w8-budget`` (the mixed_precision pass) at W4A8 on the zoo UNets: final-image PSNR and bytes.

For each model, recipe (minmax, dgq by default) and W8 budget (0%, 10%, 25%) it compiles W4A8 with
``qcompile MODEL --recipe R --wbits 4 --abits 8 --w8-budget B`` and scores the result with
``qcompile eval-diffusion FLOAT QUANT --samples N`` (DDIM, 25 steps, guidance 4, seeds 0..N-1):
PSNR of the final images vs float. A W8A8 dgq row is the reference the issue measures against.
Bytes: the output file, and the weight values at their bit widths (int4 counted two per byte, as
MatMulNBits packs them; ORT's W4 Convs hold int4 values in int8 containers, so the file does not
shrink by that much), scales excluded. Also lists the layers each budget kept at 8 bits.

Usage: python benchmarks/bench_mixed_precision.py [--models models/unet_mnist.onnx ...] [--samples 8]
       [--recipes minmax dgq] [--budgets 0 10 25] [--gptq] [--work DIR] [--out benchmarks/results]
Writes ``mixed_precision.json`` and ``mixed_precision.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", default=[ROOT / "models" / "unet_mnist.onnx"])
    parser.add_argument("--recipes", nargs="+", default=["minmax", "dgq"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0, 10, 25], help="percent")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--gptq", action="store_true", help="also every W4 row with quantize_weights.gptq=true")
    parser.add_argument("--done-only", action="store_true",
                        help="tabulate only the rows whose results are in --work already (no compile)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_mixed_precision"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    return parser.parse_args(argv)


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "qcompiler.cli.main", *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def weight_value_bytes(float_model: Path, report: dict) -> int:
    """Σ over quantized weights of size·bits/8, from the report's records and the float model's shapes."""
    sizes = {t.name: int(numpy_helper.to_array(t).size)
             for t in onnx.load(str(float_model)).graph.initializer}
    total = 0.0
    for record in report["quantized"]:
        if record["role"] == "weight" and record["tensor"] in sizes:
            bits = int(record["spec"].split()[0].removeprefix("int").removeprefix("uint"))
            total += sizes[record["tensor"]] * bits / 8
    return int(total)


def run_row(model: Path, recipe: str, wbits: int, budget: float, samples: int, work: Path, gptq: bool = False,
            done_only: bool = False) -> dict | None:
    """Compile and score one row; a row whose model, report and scores are in ``work`` already is read back."""
    tag = f"{model.stem}.{recipe}.w{wbits}a8" + (f".b{budget:g}" if wbits == 4 else "") + (".gptq" if gptq else "")
    out, scores = work / f"{tag}.onnx", work / f"{tag}.eval.json"
    args = [str(model), "--recipe", recipe, "--wbits", str(wbits), "--abits", "8", "-o", str(out), "--quiet"]
    if wbits == 4:  # one sensitivity measurement per model and recipe, whatever the budget
        args += ["--w8-budget", f"{budget:g}%",
                 "--set", f"mixed_precision.sensitivity_cache={work / f'{model.stem}.{recipe}.sensitivity.json'}"]
    if gptq:
        args += ["--set", "quantize_weights.gptq=true"]
    if done_only and not scores.exists():
        return None
    started = time.perf_counter()
    if not Path(f"{out}.report.json").exists():
        cli(*args)
    seconds = time.perf_counter() - started
    if not scores.exists():
        cli("eval-diffusion", str(model), str(out), "--samples", str(samples), "--json", str(scores))
    report = json.loads(Path(f"{out}.report.json").read_text())
    mixed = report.get("mixed_precision") or {}
    return {"model": model.stem, "recipe": recipe, "wbits": wbits, "gptq": gptq, "w8_budget_percent": budget if wbits == 4 else None,
            "psnr_db": json.loads(scores.read_text())["psnr_db"], "file_bytes": out.stat().st_size,
            "weight_value_bytes": weight_value_bytes(model, report), "compile_seconds": round(seconds, 1) if seconds > 1 else report["compile_seconds"],
            "kept_at_8": mixed.get("kept_at_8", []), "w8_share": mixed.get("w8_share", 0.0)}


def markdown(rows: list[dict], samples: int) -> str:
    command = "python benchmarks/bench_mixed_precision.py " + " ".join(sys.argv[1:])
    lines = [f"# W4A8 with a W8 byte budget (mixed_precision), {samples} images per model", "",
             f"`{command}` (rows compiled by earlier runs of the script into the same `--work` are read back).", "",
             "PSNR of the final images vs the float model (DDIM 25 steps, guidance 4, same seeds). Weight bytes: "
             "values at their bit widths (int4 two per byte), scales excluded; file: the output .onnx (ORT keeps W4 "
             "Conv values in int8 containers).", "",
             "| model | recipe | weights | PSNR dB | weight bytes | × W8 | file bytes | W8 layers (sensitivity) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    w8 = {r["model"]: r["weight_value_bytes"] for r in rows if r["wbits"] == 8}
    for r in rows:
        weights = "W8" if r["wbits"] == 8 else f"W4{' GPTQ' if r.get('gptq') else ''}, W8 budget {r['w8_budget_percent']:g}%"
        kept = ", ".join(f"{k['node']} ({k['sensitivity']:.2g})" for k in r["kept_at_8"]) or "–"
        ratio = f"{r['weight_value_bytes'] / w8[r['model']]:.2f}" if r["model"] in w8 else "–"
        lines.append(f"| {r['model']} | {r['recipe']} | {weights} | {r['psnr_db']:.2f} | {r['weight_value_bytes']:,} | "
                     f"{ratio} | {r['file_bytes']:,} | {kept} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        rows.append(run_row(model, "dgq", 8, 0, args.samples, args.work, done_only=args.done_only))
        for recipe in args.recipes:
            for gptq in (False, True) if args.gptq else (False,):
                for budget in args.budgets:
                    rows.append(run_row(model, recipe, 4, budget, args.samples, args.work, gptq, args.done_only))
                    if rows[-1] is None:
                        rows.pop()
                        continue
                    print(f"  {rows[-1]['model']} {recipe} W4 budget {budget:g}%{' GPTQ' if gptq else ''}: "
                          f"{rows[-1]['psnr_db']:.2f} dB", flush=True)
                (args.work / "rows.json").write_text(json.dumps(rows, indent=1))  # partial results so far
    rows = [row for row in rows if row is not None]
    (args.out / "mixed_precision.json").write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1))
    (args.out / "mixed_precision.md").write_text(markdown(rows, args.samples))
    print(markdown(rows, args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
