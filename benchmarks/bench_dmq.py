"""Benchmark the ``dmq`` recipe and its ablation against ``minmax`` on the trained MNIST UNet (CPU).

For each activation width (W4A8, W4A6 by default) it compiles, from the same float UNet and the
same timestep-tagged calibration folder (``qcompile collect``), the rows:
``minmax``; ``les`` (learned scales alone: no timestep weighting, no PTS); ``les+tw`` (+ adaptive
timestep weighting); ``dmq`` (+ power-of-two skip scales: the recipe); optionally more LES
iteration counts (``--iterations``) of ``dmq``. Every compile runs in its own process under
``/usr/bin/time -v`` (peak RSS) with ``torch.set_num_threads(1)``. Each row is then sampled with
the ORT DDIM sampler from the same seeds and prompts as the float model (guidance 4, 25 steps)
and scored like ``qcompile eval-diffusion``: PSNR/SSIM of the final images vs float, the MNIST
classifier's accuracy on the prompted digit, the Fréchet distance to real held-out digits in
the classifier's features. Writes ``dmq.json``, ``dmq.md`` and ``dmq_pts.png`` (histogram of the
PTS multipliers per target layer) to ``--out``.

Usage: python benchmarks/bench_dmq.py --calib /tmp/unet.calib [--samples 100] [--abits 8 6]
       [--ablation-abits 8] [--iterations 100 [MORE ...]] [--rows minmax les les+tw dmq] [--work DIR]
       [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
UNET = HERE.parent / "models" / "unet_mnist.onnx"
ROWS = ("minmax", "les", "les+tw", "dmq")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=Path, required=True, help="qcompile collect folder (timestep-tagged)")
    parser.add_argument("--model", type=Path, default=UNET)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=100, help="images per model")
    parser.add_argument("--abits", type=int, nargs="+", default=[8, 6], choices=(8, 6, 4))
    parser.add_argument("--ablation-abits", type=int, nargs="*", default=[8],
                        help="widths that get the les / les+tw rows (others: minmax and dmq only)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[100],
                        help="LES iterations; the first is used for the ablation rows, the others add dmq rows")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--compile-one", nargs=4, metavar=("ROW", "ABITS", "ITERS", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def recipe_for(row: str, iterations: int):
    """The Recipe object of an ablation row."""
    from qcompiler.recipes import Recipe, Step, get_recipe

    if row == "minmax":
        return dataclasses.replace(get_recipe("minmax"), wbits=4)
    dmq = get_recipe("dmq")
    steps = []
    for step in dmq.steps:
        config = step.config
        if step.pass_name == "learned_scales":
            config = dataclasses.replace(config, iterations=iterations, progress=False,
                                         timestep_weighting="off" if row == "les" else config.timestep_weighting)
        elif step.pass_name == "pow2_skip_scales":
            if row in ("les", "les+tw"):
                continue
            config = dataclasses.replace(config, progress=False)
        steps.append(Step(step.pass_name, config))
    return Recipe(f"dmq[{row}]", dmq.description, tuple(steps), wbits=4, abits=dmq.abits)


def compile_one(row: str, abits: int, iterations: int, out: Path, model: Path, calib: Path) -> None:
    """In a child process: compile one row and print its report's key numbers as JSON."""
    import torch

    torch.set_num_threads(1)
    import qcompiler
    from qcompiler.api import CompileOptions

    started = time.perf_counter()
    result = qcompiler.quantize(model, recipe_for(row, iterations), calib, out,
                                CompileOptions(wbits=4, abits=abits, progress=False))
    report = result.report
    pts = [r for r in report["quantized"] if r["role"] == "pts"]
    pts_layers = {}
    for record in pts:
        pts_layers.setdefault(record["node"], record["multipliers"])
    print("RESULT " + json.dumps({
        "compile_s": round(time.perf_counter() - started, 1),
        "passes": [{k: p[k] for k in ("name", "seconds", "notes")} for p in report["passes"]],
        "integer_gemms": report["integer_kernels"]["integer_gemms"],
        "float_gemms": report["integer_kernels"]["float_gemms"],
        "quantized_gemms": report["quantized_gemms"], "fallbacks": len(report["fallbacks"]),
        "warnings": report.get("warnings", []), "pts": pts_layers}), flush=True)


def run_compile(row: str, abits: int, iterations: int, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--calib", str(args.calib), "--model", str(args.model),
               "--compile-one", row, str(abits), str(iterations), str(out)]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    done = subprocess.run(timer + command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compile {row} a{abits} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result["peak_rss_mb"] = round(int(peak.group(1)) / 1024, 1) if peak else None
    return result


class Scorer:
    """Samples the float model once (cached in the work folder) and scores rows like eval-diffusion."""

    def __init__(self, float_model: Path, samples: int, work: Path):
        from qcompiler.diffusion import metrics
        from qcompiler.diffusion.evaluate import quality, real_heldout_features, sample_model
        from qcompiler.diffusion.sampler import config_for

        self.metrics, self.quality, self.sample_model = metrics, quality, sample_model
        self.float_model, self.samples = float_model, samples
        self.config = config_for(float_model, steps=25, guidance_scale=4.0)
        cache = work / f"float_images.{samples}.npz"
        if cache.exists():
            with np.load(cache) as data:
                self.images, self.labels = data["images"], data["labels"]
        else:
            self.images, self.labels = sample_model(float_model, samples, self.config, 0)
            np.savez(cache, images=self.images, labels=self.labels)
        self.classifier = metrics.Classifier.for_denoiser(float_model)
        self.real = real_heldout_features(self.classifier)
        self.reference = quality(self.images, self.labels, self.classifier, self.real)
        self.floats = {"accuracy": float(self.reference["accuracy"]), "frechet": float(self.reference["frechet"])}

    def __call__(self, row: dict) -> None:
        started = time.perf_counter()
        images, _ = self.sample_model(row["path"], self.samples, self.config, 0, text_source=self.float_model)
        scored = self.quality(images, self.labels, self.classifier, self.real)
        metrics = self.metrics
        row.update({"psnr_db": float(np.mean(metrics.psnr_per_image(self.images, images))),
                    "ssim": float(metrics.ssim(self.images, images)), "accuracy": float(scored["accuracy"]),
                    "frechet": float(scored["frechet"]),
                    "frechet_vs_float": float(metrics.frechet_distance(scored["features"],
                                                                       self.reference["features"])),
                    "sample_s": round(time.perf_counter() - started, 1)})


def histogram_png(rows: list[dict], path: Path) -> Path | None:
    """Per PTS target layer: how many channels took m = 1, 1/2, 1/4, 1/8 (first dmq row of each width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [row for row in rows if row["row"].startswith("dmq") and row.get("pts")]
    if not chosen:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 3.2), squeeze=False)
    for ax, row in zip(axes[0], chosen):
        layers = list(row["pts"])
        bottom = np.zeros(len(layers))
        for m, label in ((1.0, "1"), (0.5, "1/2"), (0.25, "1/4"), (0.125, "1/8")):
            counts = np.array([sum(v == m for v in row["pts"][name]) for name in layers])
            ax.bar(range(len(layers)), counts, bottom=bottom, label=f"m = {label}")
            bottom += counts
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([name.split("/")[2] + "/" + name.split("/")[3] if name.count("/") > 3 else name
                            for name in layers], rotation=30, ha="right", fontsize=6)
        ax.set_ylabel("channels")
        ax.set_title(f"PTS multipliers, {row['row']} W4A{row['abits']}", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown(results: list[dict], floats: dict, meta: dict) -> str:
    lines = ["# DMQ on the trained MNIST UNet: ablation vs minmax (CPU, W4)", "",
             f"Command: `{meta['command']}`  ", f"Date (UTC): {meta['date']}  ",
             (f"Machine: {meta['cpus']} CPUs (1-min load {meta['load']:.2f} at start, shared), "
              f"Python {meta['python']}, torch threads 1  "),
             (f"Calibration: `{meta['calib']}` ({meta['calib_samples']} samples); evaluation: {meta['samples']} "
              "images, DDIM 25 steps, guidance 4, seeds 0..N−1, same prompts for every row.  "),
             (f"Float model: classifier accuracy {floats['accuracy']:.3f}, Fréchet distance to real digits "
              f"{floats['frechet']:.2f}."), "",
             ("| W/A | row | LES iters | PSNR dB | SSIM | accuracy | Fréchet | Fréchet vs float | int / float GEMMs "
              "| explicit Muls | compile s | peak RSS MB |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        lines.append(f"| W4A{row['abits']} | {row['row']} | {row['iterations'] if row['row'] != 'minmax' else '–'} | "
                     f"{row['psnr_db']:.2f} | {row['ssim']:.4f} | {row['accuracy']:.3f} | {row['frechet']:.2f} | "
                     f"{row['frechet_vs_float']:.2f} | {row['integer_gemms']} / {row['float_gemms']} | "
                     f"{row['fallbacks']} | {row['compile_s']:.0f} | {row['peak_rss_mb']} |")
    lines += ["", ("Rows: `les` = learned_scales without timestep weighting and without PTS; `les+tw` = with "
                   "adaptive timestep weighting (r = 20); `dmq` = the recipe (LES + weighting + pow2_skip_scales). "
                   "All use int4 weights with an MSE clip search (MatMulNBits for MatMul, int4-in-int8 for Conv/Gemm) "
                   "and per-tensor static activations; `minmax` uses min/max int4 weights."), ""]
    for row in results:
        if row.get("pts"):
            counts = {m: sum(sum(v == m for v in values) for values in row["pts"].values())
                      for m in (1.0, 0.5, 0.25, 0.125)}
            lines.append(f"PTS ({row['row']}, W4A{row['abits']}): {len(row['pts'])} layers; channels with m = "
                         f"1/½/¼/⅛: {counts[1.0]}/{counts[0.5]}/{counts[0.25]}/{counts[0.125]}  ")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_one:
        row, abits, iterations, out = args.compile_one
        compile_one(row, int(abits), int(iterations), Path(out), args.model, args.calib)
        return 0
    meta = {"command": "python benchmarks/bench_dmq.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "python": platform.python_version(), "calib": str(args.calib),
            "calib_samples": sum(int(np.load(f)["sample"].shape[0]) for f in args.calib.glob("*.npz")),
            "samples": args.samples}
    work = args.work or Path(tempfile.mkdtemp(prefix="qcompile-bench-dmq-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = []
    for abits in args.abits:  # minmax and dmq of every width first, then the ablation rows
        plan += [(row, abits, args.iterations[0]) for row in args.rows if row in ("minmax", "dmq")]
    for abits in args.ablation_abits:
        plan += [(row, abits, args.iterations[0]) for row in args.rows if row not in ("minmax", "dmq")]
        plan += [("dmq", abits, iterations) for iterations in args.iterations[1:]]
    print("[bench_dmq] sampling the float model ...", flush=True)
    scorer = Scorer(args.model, args.samples, work)
    results = []
    for row, abits, iterations in plan:
        out = work / f"unet.{row}.it{iterations}.w4a{abits}.onnx"
        cached = out.with_suffix(".bench.json")  # a row done by an earlier (interrupted) run is reused
        if cached.exists():
            results.append(json.loads(cached.read_text()))
        else:
            print(f"[bench_dmq] W4A{abits} {row} (LES {iterations} it): compile ...", flush=True)
            result = {"row": row, "abits": abits, "iterations": iterations, "path": str(out),
                      **run_compile(row, abits, iterations, out, args)}
            print(f"[bench_dmq] W4A{abits} {row}: sample {args.samples} images ...", flush=True)
            scorer(result)
            cached.write_text(json.dumps(result, default=float))
            results.append(result)
        histogram_png(results, args.out / "dmq_pts.png")
        (args.out / "dmq.json").write_text(json.dumps({"meta": meta, "float": scorer.floats, "results": results},
                                                      indent=1, default=float))
        (args.out / "dmq.md").write_text(markdown(results, scorer.floats, meta))
    print(markdown(results, scorer.floats, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
