"""TensorRT target check: SQNR vs the ORT target on CPU here, and FP16/INT8/INT4 engines where a GPU is.

For each bundled model (the trained UNet and DiT) at W8A8 and W4A8 with one recipe:
1. compile with ``--target ort`` and ``--target tensorrt`` on the same calibration rows (CPU);
2. check the TensorRT-target model against ``qcompiler.targets.tensorrt_rules``;
3. run both in ONNX Runtime (CPU) on held-out rows: SQNR of each vs float, and of TensorRT vs ORT;
4. where ``tensorrt`` imports (a machine with an NVIDIA GPU): build an FP16 engine of the float model
   (weakly typed, FP16 flag) and a strongly typed engine of the TensorRT-target model, time both
   (median of ``--runs``) and report latency vs FP16 and the engine's output SQNR vs the ORT target.
Without TensorRT step 4 prints one line saying why and the CPU columns are still measured.

    python benchmarks/gpu_check.py                       # minmax, UNet + DiT, W8A8 + W4A8
    python benchmarks/gpu_check.py --recipes dgq dmq --models unet_mnist --runs 100
    python benchmarks/gpu_check.py --recipes minmax smoothquant osplus dgq dmq \
        --set learned_scales.iterations=3 learned_scales.samples=4 learned_scales.batch_size=2
Writes ``benchmarks/results/gpu_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qcompiler  # noqa: E402
from qcompiler.api import CompileOptions  # noqa: E402
from qcompiler.quant import sqnr_db  # noqa: E402
from qcompiler.runtimes.ort import make_session  # noqa: E402
from qcompiler.runtimes.tensorrt import Engine, EngineOptions, unavailable  # noqa: E402
from qcompiler.targets.tensorrt_rules import check  # noqa: E402

MODELS = ROOT / "models"


def feeds(model: str, seed: int, count: int, rows: int) -> list[dict[str, np.ndarray]]:
    """UNet: rows of the shipped calibration files (seed 0: even files, 1: odd); DiT: seeded noise,
    timesteps and labels (its sampler starts from noise; no calibration folder ships with it)."""
    if model == "unet_mnist":
        files = sorted((MODELS / "unet_mnist.calib").glob("*.npz"))[seed::2][:count]
        batches = []
        for path in files:
            with np.load(path) as data:
                batches.append({k: data[k][:rows] for k in data.files if not k.startswith("__")})
        return batches
    rng = np.random.default_rng(seed)
    return [{"sample": rng.standard_normal((rows, 1, 32, 32)).astype(np.float32),
             "timestep": rng.integers(1, 1000, rows).astype(np.float32),
             "class_labels": rng.integers(0, 11, rows).astype(np.int64)} for _ in range(count)]


def ort_outputs(path: Path, batches) -> np.ndarray:
    session = make_session(str(path), threads=2)
    return np.concatenate([session.run(None, batch)[0].ravel() for batch in batches])


def engine_figures(float_path: Path, trt_path: Path, batches, reference: np.ndarray, runs: int) -> dict:
    shapes = {name: value.shape for name, value in batches[0].items()}
    with Engine(float_path, EngineOptions(strongly_typed=False, fp16=True, shapes=shapes)) as fp16, \
            Engine(trt_path, EngineOptions(strongly_typed=True, shapes=shapes)) as quantized:
        out = np.concatenate([next(iter(quantized.run(b).values())).ravel() for b in batches])
        fp16_ms = fp16.time(batches[0], runs=runs).median_ms
        quantized_ms = quantized.time(batches[0], runs=runs).median_ms
    return {"fp16_ms": fp16_ms, "engine_ms": quantized_ms, "speedup_vs_fp16": fp16_ms / quantized_ms,
            "engine_sqnr_vs_ort_target_db": sqnr_db(reference, out)}


def recipe_with(name: str, settings: list[str]):
    """The recipe with ``--set PASS.FIELD=VALUE`` applied to the passes it runs (others ignored)."""
    from qcompiler.recipes import get_recipe, parse_setting

    recipe = get_recipe(name)
    passes = {step.pass_name for step in recipe.steps}
    chosen: dict = {}
    for text in settings:
        pass_name, field, value = parse_setting(text)
        if pass_name in passes:
            chosen.setdefault(pass_name, {})[field] = value
    return recipe.with_settings(chosen) if chosen else recipe


def measure(model: str, recipe: str, wbits: int, args, work: Path, gpu: bool) -> dict:
    source = MODELS / f"{model}.onnx"
    calib, held = feeds(model, 0, args.calib, args.rows), feeds(model, 1, args.heldout, args.rows)
    paths = {}
    for target in ("ort", "tensorrt"):
        paths[target] = work / f"{model}.{recipe}.w{wbits}a8.{target}.onnx"
        qcompiler.quantize(source, recipe_with(recipe, args.set), calib, paths[target],
                           CompileOptions(wbits=wbits, abits=8, target=target, progress=False, write_report=False))
    floats, ort, trt = (ort_outputs(p, held) for p in (source, paths["ort"], paths["tensorrt"]))
    row = {"model": model, "recipe": recipe, "bits": f"W{wbits}A8", "rule_violations": len(check(paths["tensorrt"])),
           "ort_sqnr_db": sqnr_db(floats, ort), "tensorrt_on_ort_sqnr_db": sqnr_db(floats, trt),
           "tensorrt_vs_ort_target_db": sqnr_db(ort, trt)}
    if gpu:
        row.update(engine_figures(source, paths["tensorrt"], held, ort, args.runs))
    return row


def markdown(rows: list[dict], gpu_note: str | None, command: str) -> str:
    head = ["model", "recipe", "bits", "violations", "ORT target (dB vs float)", "TensorRT target in ORT (dB)",
            "Δ (dB)", "TRT vs ORT target (dB)"]
    if not gpu_note:
        head += ["FP16 engine (ms)", "Q engine (ms)", "speed-up vs FP16", "engine vs ORT target (dB)"]
    lines = [f"# TensorRT target check\n\n`{command}`\n", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["recipe"], r["bits"], r["rule_violations"], f"{r['ort_sqnr_db']:.2f}",
                 f"{r['tensorrt_on_ort_sqnr_db']:.2f}", f"{r['tensorrt_on_ort_sqnr_db'] - r['ort_sqnr_db']:+.2f}",
                 f"{r['tensorrt_vs_ort_target_db']:.2f}"]
        if not gpu_note:
            cells += [f"{r['fp16_ms']:.3f}", f"{r['engine_ms']:.3f}", f"{r['speedup_vs_fp16']:.2f}×",
                      f"{r['engine_sqnr_vs_ort_target_db']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if gpu_note:
        lines.append(f"\nEngines not built: {gpu_note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet_mnist", "dit_mnist"])
    parser.add_argument("--recipes", nargs="+", default=["minmax"])
    parser.add_argument("--set", nargs="*", default=[], metavar="PASS.FIELD=VALUE",
                        help="settings for the passes of the recipes that run them (e.g. a quick dmq)")
    parser.add_argument("--wbits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--calib", type=int, default=4, help="calibration batches")
    parser.add_argument("--heldout", type=int, default=4, help="held-out batches")
    parser.add_argument("--rows", type=int, default=8, help="rows per batch (also the engines' batch size)")
    parser.add_argument("--runs", type=int, default=50, help="timed engine runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    gpu_note = unavailable()
    if gpu_note:
        print(f"gpu_check: {gpu_note}: measuring the CPU columns only")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for model in args.models:
            for recipe in args.recipes:
                for wbits in args.wbits:
                    rows.append(measure(model, recipe, wbits, args, Path(tmp), gpu_note is None))
                    print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, gpu_note, command.strip())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"rows": rows, "engines": gpu_note or "built"}, indent=2))
    (args.out / "gpu_check.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
