"""Benchmark ``--w8-budget`` (the mixed_precision pass) at W4A8 on the zoo UNets: final-image PSNR and bytes.

For each model, recipe (minmax, dgq by default) and W8 budget (0%, 10%, 25%) it compiles W4A8 with
``qcompile MODEL --recipe R --wbits 4 --abits 8 --w8-budget B`` and scores the result with
``qcompile eval-diffusion FLOAT QUANT --samples N`` (DDIM, 25 steps, guidance 4, seeds 0..N-1):
PSNR of the final images vs float. A W8A8 dgq row is the reference the issue measures against.
Bytes: the weight values at their bit widths (int4 two per byte, scales excluded), every stored tensor
(initializers: weights as packed, scales, biases) and the output file (tensors plus the graph structure,
which does not grow with the parameters). Also lists the layers each budget kept at 8 bits.

Usage: python benchmarks/bench_mixed_precision.py [--models unet_mnist unet_mnist_b unet_mnist_c ...] [--samples 8]
       [--recipes minmax dgq] [--budgets 0 10 25] [--gptq] [--work DIR] [--out benchmarks/results]
       python benchmarks/bench_mixed_precision.py --models unet_mnist unet_mnist_b --name zoo_w4a8 \
       --cells dgq:8 minmax:4 osplus:4 dgq:4 dmq:4 minmax:4:0:clip minmax:4:10:gptq dgq:4:10:gptq
Writes ``NAME.json`` and ``NAME.md`` (``--name``, default ``mixed_precision``) to ``--out`` after every
row, so a cut-off run keeps what it measured; ``--cells`` (``RECIPE:WBITS[:BUDGET%][:gptq][:clip][:bs32|bs64|bs128][:PASS.FIELD=VALUE]``,
``clip`` = ``quantize_weights.clip_search=true``, ``PASS.FIELD=VALUE`` = a ``--set`` for the compile) replaces the recipes x budgets grid and adds ``NAME.png``
and a per-model check of the issue's criteria. Each row records its effective int4 weight quantizer
(clip search on by flag or by the recipe's own default, GPTQ or not), the key the dmq-vs-minmax check pairs on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet_mnist"],
                        help="zoo names (models/NAME.onnx) or paths to .onnx denoisers")
    parser.add_argument("--recipes", nargs="+", default=["minmax", "dgq"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0, 10, 25], help="percent")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--gptq", action="store_true", help="also every W4 row with quantize_weights.gptq=true")
    parser.add_argument("--cells", nargs="+", help="RECIPE:WBITS[:BUDGET][:gptq][:clip] rows, run in this order")
    parser.add_argument("--name", default="mixed_precision", help="output file stem in --out")
    parser.add_argument("--done-only", action="store_true",
                        help="tabulate only the rows whose results are in --work already (no compile)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_mixed_precision"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.models = [Path(m) if m.endswith(".onnx") else ROOT / "models" / f"{m}.onnx" for m in args.models]
    return args


def parse_cell(text: str) -> tuple[str, int, float, bool, bool, tuple[str, ...]]:
    """``"dgq:4:10:gptq"`` -> ("dgq", 4, 10.0, True, False, ()); budget defaults to 0 and applies to W4 only;
    ``PASS.FIELD=VALUE`` parts are ``--set`` overrides and ``bs64`` the block size ``block_size=64`` (last element)."""
    parts = text.split(":")
    flags = {part for part in parts[2:] if part in ("gptq", "clip")}
    # bsNN: the int4 block size of MatMul weights (--block-size), carried with the overrides as block_size=NN
    parts = [f"block_size={part[2:]}" if part in ("bs32", "bs64", "bs128") else part for part in parts]
    sets = tuple(part for part in parts[2:] if "=" in part)
    parts = [part for part in parts if part not in flags and part not in sets]
    if len(parts) not in (2, 3) or parts[1] not in ("4", "8"):
        raise SystemExit(f"--cells: {text!r} is not RECIPE:WBITS[:BUDGET][:gptq][:clip][:PASS.FIELD=VALUE] "
                         "with WBITS 4 or 8")
    budget = float(parts[2].rstrip("%")) if len(parts) == 3 else 0.0
    return parts[0], int(parts[1]), budget, "gptq" in flags, "clip" in flags, sets


def recipe_clip_search(recipe: str, bits: int) -> bool:
    """Whether the recipe's own quantize_weights step runs the MSE clip search at these bits."""
    from qcompiler.passes.quantize_weights import (
        QuantizeWeightsConfig,
        uses_clip_search,
    )
    from qcompiler.recipes import available_recipes

    step = next((s for s in available_recipes()[recipe].steps if s.pass_name == "quantize_weights"), None)
    return uses_clip_search((step and step.config) or QuantizeWeightsConfig(), bits)


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "qcompiler.cli.main", *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def tensor_bytes(path: Path) -> int:
    """Bytes of every initializer as stored (weights, scales, zero points, biases): the file less its graph
    structure (node names, shapes), which does not grow with the parameters."""
    return sum(len(t.raw_data) or len(t.SerializeToString()) for t in onnx.load(str(path)).graph.initializer)


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
            done_only: bool = False, clip: bool = False, sets: tuple[str, ...] = ()) -> dict | None:
    """Compile and score one row; a row whose model, report and scores are in ``work`` already is read back."""
    tag = f"{model.stem}.{recipe}.w{wbits}a8" + (f".b{budget:g}" if wbits == 4 else "") + (".gptq" if gptq else "") + (".clip" if clip else "")
    tag += "".join("." + s.split(".", 1)[-1].replace("=", "-") for s in sets)
    out, scores = work / f"{tag}.onnx", work / f"{tag}.eval.json"
    args = [str(model), "--recipe", recipe, "--wbits", str(wbits), "--abits", "8", "-o", str(out), "--quiet"]
    if wbits == 4:  # one sensitivity measurement per model and recipe, whatever the budget
        args += ["--w8-budget", f"{budget:g}%",
                 "--set", f"mixed_precision.sensitivity_cache={work / f'{model.stem}.{recipe}.sensitivity.json'}"]
    if gptq:
        args += ["--set", "quantize_weights.gptq=true"]
    if clip:
        args += ["--set", "quantize_weights.clip_search=true"]
    for override in sets:
        args += ["--block-size", override.split("=")[1]] if override.startswith("block_size=") else ["--set", override]
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
    evaluation = json.loads(scores.read_text())
    return {"model": model.stem, "recipe": recipe, "wbits": wbits, "gptq": gptq, "sets": list(sets),
            "clip_search": wbits == 4 and (clip or recipe_clip_search(recipe, wbits)), "w8_budget_percent": budget if wbits == 4 else None,
            "psnr_db": evaluation["psnr_db"], "psnr_db_per_image": evaluation.get("psnr_db_per_image"),
            "samples": evaluation["samples"], "file_bytes": out.stat().st_size, "tensor_bytes": tensor_bytes(out),
            "weight_value_bytes": weight_value_bytes(model, report), "compile_seconds": round(seconds, 1) if seconds > 1 else report["compile_seconds"],
            "kept_at_8": mixed.get("kept_at_8", []), "w8_share": mixed.get("w8_share", 0.0),
            "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(scores.stat().st_mtime))}


def markdown(rows: list[dict], samples: int) -> str:
    command = "python benchmarks/bench_mixed_precision.py " + " ".join(sys.argv[1:])
    lines = [f"# W4A8 with a W8 byte budget (mixed_precision), {samples} images per model", "",
             (f"`{command}` (rows compiled by earlier runs of the script into the same `--work` are read back; "
              "`measured`: when the row's images were scored, UTC)."), "",
             ("PSNR of the final images vs the float model (DDIM 25 steps, guidance 4, same seeds). Weight bytes: "
              "values at their bit widths (int4 two per byte), scales excluded; tensors: every initializer as stored "
              "(weights, scales, biases; int4 Conv values packed by the ORT target unless it reports int8 containers); "
              "file: the output .onnx, tensors plus the graph structure (node names, shapes), which does not grow with "
              "the parameters. × W8: against the same model's W8A8 dgq row."), "",
             "| model | recipe | weights | PSNR dB | weight bytes | × W8 | tensor bytes | × W8 | file bytes | × W8 | measured | W8 layers (sensitivity) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    w8 = {r["model"]: r["weight_value_bytes"] for r in rows if r["wbits"] == 8}
    w8_rows = {r["model"]: r for r in rows if r["wbits"] == 8}

    def times(r, key):
        ref = w8_rows.get(r["model"], {}).get(key)
        return f"{r[key] / ref:.2f}" if ref and r.get(key) else "–"

    for r in rows:
        weights = weights_label(r)
        kept = ", ".join(f"{k['node']} ({k['sensitivity']:.2g})" for k in r["kept_at_8"]) or "–"
        ratio = f"{r['weight_value_bytes'] / w8[r['model']]:.2f}" if r["model"] in w8 else "–"
        lines.append(f"| {r['model']} | {recipe_label(r)} | {weights} | {r['psnr_db']:.2f} | {r['weight_value_bytes']:,} | "
                     f"{ratio} | {r.get('tensor_bytes', 0):,} | {times(r, 'tensor_bytes')} | {r['file_bytes']:,} | "
                     f"{times(r, 'file_bytes')} | {r.get('measured_at', '–')} | {kept} |")
    return "\n".join(lines) + "\n"


def criteria(rows: list[dict]) -> list[str]:
    """Per model: best W4A8 row at <= 0.6x W8 bytes within 3 dB of W8A8 dgq? dmq >= minmax per weight quantizer?"""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ref = next((r for r in mine if r["wbits"] == 8 and r["recipe"] == "dgq"), None)
        if ref is None:
            lines.append(f"- {model}: no W8A8 dgq row measured")
        small = [r for r in mine if ref is not None and r["wbits"] == 4
                 and r["weight_value_bytes"] <= 0.6 * ref["weight_value_bytes"]]
        if small:
            best = max(small, key=lambda r: r["psnr_db"])
            gap = ref["psnr_db"] - best["psnr_db"]
            lines.append(f"- {model}: best W4A8 {best['recipe']} ({weights_label(best)}) {best['psnr_db']:.2f} dB at "
                         f"{best['weight_value_bytes'] / ref['weight_value_bytes']:.2f}x W8 weight bytes"
                         + (f" ({best['tensor_bytes'] / ref['tensor_bytes']:.2f}x its tensors, "
                            f"{best['file_bytes'] / ref['file_bytes']:.2f}x its file)" if ref.get("tensor_bytes") else "")
                         + " vs W8A8 dgq "
                         f"{ref['psnr_db']:.2f} dB: gap {gap:.2f} dB, {'within' if gap <= 3 else 'NOT within'} 3 dB")
        key = lambda r: (r["gptq"], r.get("clip_search", False), r["w8_budget_percent"])
        for quantizer in dict.fromkeys(key(r) for r in mine if r["wbits"] == 4):
            same = [r for r in mine if r["wbits"] == 4 and key(r) == quantizer]
            minmax = next((r for r in same if r["recipe"] == "minmax" and not r.get("sets")), None)
            for dmq in (r for r in same if r["recipe"] == "dmq" and minmax is not None):
                lines.append(f"- {model}: {recipe_label(dmq)} {dmq['psnr_db']:.2f} vs minmax {minmax['psnr_db']:.2f} dB "
                             f"({weights_label(dmq)}{paired(dmq, minmax)}): "
                             f"dmq {'>=' if dmq['psnr_db'] >= minmax['psnr_db'] else '<'} minmax")
    return lines


def paired(row: dict, reference: dict) -> str:
    """", paired difference d ± SE over N images" when both rows scored the same seeds image by image."""
    a, b = row.get("psnr_db_per_image"), reference.get("psnr_db_per_image")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return ""
    diff = np.asarray(a) - np.asarray(b)
    return f"; paired difference {diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(diff.size):.2f} dB (SE, {diff.size} images)"


def recipe_label(r: dict) -> str:
    return r["recipe"] + "".join(f" {s.split('.', 1)[-1]}" for s in r.get("sets") or ())


def weights_label(r: dict) -> str:
    if r["wbits"] == 8:
        return "W8"
    quantizer = "+".join(name for name, on in (("GPTQ", r.get("gptq")), ("clip", r.get("clip_search"))) if on)
    return f"W4{' ' + quantizer if quantizer else ''}, W8 budget {r['w8_budget_percent']:g}%"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(f"{recipe_label(r)} {weights_label(r)}" for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 4))
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        psnr = {f"{recipe_label(r)} {weights_label(r)}": r["psnr_db"] for r in rows if r["model"] == model}
        xs = [i + m * width for i, label in enumerate(labels) if label in psnr]
        ax.bar(xs, [psnr[label] for label in labels if label in psnr], width, label=model)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([label.replace(", ", "\n").replace(" W", "\nW", 1) for label in labels], fontsize=7)
    ax.set_ylabel("final-image PSNR vs float (dB)")
    ax.set_title("A8 rows on the zoo UNets (same seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], args) -> None:
    text = markdown(rows, args.samples)
    if args.cells:
        text += "\n## Criteria (issue 20)\n\n" + "\n".join(criteria(rows)) + "\n"
        plot(rows, args.out / f"{args.name}.png")
    (args.out / f"{args.name}.json").write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1))
    (args.out / f"{args.name}.md").write_text(text)


def grid(args) -> list[tuple[str, int, float, bool]]:
    if args.cells:
        return [parse_cell(cell) for cell in args.cells]
    cells = [("dgq", 8, 0.0, False, False, ())]
    for recipe in args.recipes:
        for gptq in (False, True) if args.gptq else (False,):
            cells += [(recipe, 4, budget, gptq, False, ()) for budget in args.budgets]
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cells = grid(args)
    # --cells: every model per cell before the next cell, so a cut-off run has both models' early cells
    order = [(c, m) for c in cells for m in args.models] if args.cells else [(c, m) for m in args.models for c in cells]
    rows = []
    for (recipe, wbits, budget, gptq, clip, sets), model in order:
        try:
            row = run_row(model, recipe, wbits, budget, args.samples, args.work, gptq, args.done_only, clip, sets)
        except subprocess.CalledProcessError as error:  # one failing cell must not lose the others
            print(f"  {model.stem} {recipe} W{wbits}: failed ({error})", flush=True)
            continue
        if row is None:
            continue
        rows.append(row)
        print(f"  {row['model']} {recipe} {weights_label(row)}: {row['psnr_db']:.2f} dB", flush=True)
        write(rows, args)
    write(rows, args)
    print(markdown(rows, args.samples))
    print("\n".join(criteria(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
