"""Benchmark every recipe on the trained diffusion models: final-image quality, kernels, latency, cost.

For each model (``unet``: models/unet_mnist.onnx; ``dit``: models/dit_mnist.onnx when present),
setting (W8A8, W8A6, W4A8, W4A6) and recipe, the row's model is compiled by the ``qcompile`` CLI
in a child process (wall time, and its peak RSS from GNU time's %M) on the model's
calibration folder (``models/<name>.calib`` or ``qcompile collect``-ed into the work folder), then:

- quality: the float and the quantized denoiser sample the same prompts and seeds (DDIM 25 steps,
  guidance 4, ``qcompiler.diffusion``); PSNR and SSIM of the final images vs float, the MNIST
  classifier's accuracy for the prompted digit, the Fréchet distance to real held-out digits and
  to the float samples (classifier features);
- kernels: integer / float GEMMs in ORT's optimized graph (the compile report) and how many
  quantized nodes took each lowering;
- latency: one denoiser call at the sampler's batch (both guidance halves), ``--runs`` timed runs
  interleaved across the rows of a model (one run of each row per round), one intra-op thread.

DGQ rows run the target's default lowering (one integer GEMM per GEMM) and sample from the deployed
model. A row that asks for ``--channel-groups split`` (K partial integer GEMMs, exact) is slow to
sample hundreds of images through on this CPU, so its images come from a twin compiled with
``--channel-groups simulate`` (per-channel QDQ before float GEMMs: one denoiser call gives the same
numbers to float rounding, ``tests/targets/test_ort_groups.py``), and its kernels and latency from the
split model. Over 25 chained DDIM steps a float-rounding difference can flip a quantization code
and the trajectories drift apart a little, so each such row also records, on the first
``--check-samples`` images, the PSNR of split vs simulate images and each one's PSNR vs float.

The variant rows (``--ablation``): DGQ at W8A8 with attention float / linear / log2, with and
without the start-token exemption, K = 1/8/16, per-timestep ranges and the fold lowering (also at
W8A6 and W4A8); DMQ with the adaptive
timestep weighting; at W4, minmax with the MSE clip search of the int4 weight scales (dgq's and
dmq's W4 default) and dgq with min/max int4 weights.

Rows are cached in ``--work`` (``rows/*.json``): rerunning skips finished rows, so an interrupted
run resumes. Writes ``diffusion.json``, ``diffusion.md`` and ``diffusion.png`` to ``--out``.

Usage: python benchmarks/bench_diffusion.py [--models unet dit] [--settings w8a8 w8a6 w4a8 w4a6]
       [--recipes minmax smoothquant osplus dgq dmq] [--samples 64] [--ablation] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusion_rows import Row, ablation_rows, dmq_rows, fold_rows, main_rows, weight_clip_rows

# unet_b, unet_c: the held-out zoo UNets (other widths, depth and attention placement, seeds 1, 2), not
# in the default runs: it checks that a recipe change helps beyond the model it was tuned on.
MODELS = {"unet": "unet_mnist", "unet_b": "unet_mnist_b", "unet_c": "unet_mnist_c", "dit": "dit_mnist"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "dit"], choices=sorted(MODELS))
    parser.add_argument("--settings", nargs="+", default=["w8a8", "w8a6", "w4a8", "w4a6"])
    parser.add_argument("--recipes", nargs="+", default=["minmax", "smoothquant", "osplus", "dgq", "dmq"])
    parser.add_argument("--ablation", action="store_true", help="also the DGQ ablation rows (W8A8)")
    parser.add_argument("--samples", type=int, default=64, help="images per model (seeds 0..N-1)")
    parser.add_argument("--check-samples", type=int, default=4, help="images comparing DGQ split vs simulate")
    parser.add_argument("--runs", type=int, default=10, help="timed denoiser calls per row (interleaved)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("build/bench_diffusion"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def models_dir() -> Path:
    import qcompiler.models

    return Path(qcompiler.models.__file__).parent


def calibration(name: str, work: Path) -> Path:
    """The shipped ``<name>.calib`` folder, else one collected into ``work`` (16 prompts x 25 steps)."""
    shipped = models_dir() / f"{name}.calib"
    if shipped.is_dir():
        return shipped
    folder = work / f"{name}.calib"
    if not folder.is_dir():
        run_child(["collect", str(models_dir() / f"{name}.onnx"), "--prompts", "16", "--steps", "25",
                   "-o", str(folder)])
    return folder


def run_child(arguments: list[str]) -> tuple[float, float | None]:
    """Run ``qcompile ARGS`` in a child; (wall seconds, its peak RSS in MiB, None if unmeasurable).

    The peak comes from GNU time's %M, not from ``os.wait4``: Linux carries a process's RSS high-water
    mark across exec, so a child forked from this (large) benchmark process would report at least
    the parent's size. GNU time forks the command from its own small process.
    """
    gnu_time = Path("/usr/bin/time")
    command = [sys.executable, "-m", "qcompiler.cli.main", *arguments]
    report = Path(tempfile.mkstemp(suffix=".rss")[1])
    wrapped = [str(gnu_time), "-f", "%M", "-o", str(report), *command] if gnu_time.exists() else command
    started = time.perf_counter()
    child = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    seconds = time.perf_counter() - started
    text = report.read_text().strip().splitlines() if report.exists() else []
    report.unlink(missing_ok=True)
    if child.returncode != 0:
        raise RuntimeError(f"`{shlex.join(command)}` failed:\n{child.stdout[-3000:]}")
    return seconds, (int(text[-1]) / 1024 if text and text[-1].isdigit() else None)


def compile_row(row: Row, model: Path, calib: Path, work: Path, lowering: str | None = None) -> dict:
    """Compile ``row`` (``lowering`` overrides DGQ's channel-group lowering); its report + cost."""
    out = work / f"{row.key(lowering)}.onnx"
    report_path = Path(f"{out}.report.json")
    if not report_path.exists():
        args = [str(model), "--recipe", row.recipe_arg(work), "--calib", str(calib),
                "-o", str(out), "--wbits", str(row.wbits), "--abits", str(row.abits), "--quiet", *row.extra]
        if lowering:
            args += ["--channel-groups", lowering]
        seconds, peak = run_child(args)
        (work / f"{row.key(lowering)}.cost.json").write_text(json.dumps({"wall_s": seconds, "peak_rss_mib": peak,
                                                                       "rss_method": "gnu-time"}))
    cost = json.loads((work / f"{row.key(lowering)}.cost.json").read_text())
    return {"path": str(out), "report": json.loads(report_path.read_text()), **cost}


class Sampler:
    """Float images once per model; quantized images per row (same prompts and seeds)."""

    def __init__(self, model: Path, samples: int, work: Path):
        from qcompiler.diffusion import metrics
        from qcompiler.diffusion.evaluate import (
            quality,
            real_heldout_features,
            sample_model,
        )
        from qcompiler.diffusion.sampler import config_for

        self.model, self.samples = model, samples
        self.config = config_for(model, steps=25, guidance_scale=4.0)
        self._sample, self._quality, self.metrics = sample_model, quality, metrics
        self.classifier = metrics.Classifier.for_denoiser(model)
        self.real = real_heldout_features(self.classifier)
        cache = work / f"{model.stem}.float{samples}.npz"
        if not cache.exists():
            images, labels = sample_model(model, samples, self.config)
            np.savez(cache, images=images, labels=labels)
        data = np.load(cache)
        self.float_images, self.labels = data["images"], data["labels"]
        self.float_quality = quality(self.float_images, self.labels, self.classifier, self.real)

    def images(self, path: str | Path, samples: int | None = None) -> np.ndarray:
        return self._sample(path, samples or self.samples, self.config, text_source=self.model)[0]

    def score(self, images: np.ndarray) -> dict:
        m, q = self.metrics, self._quality(images, self.labels, self.classifier, self.real)
        return {"psnr_db": float(np.mean(m.psnr_per_image(self.float_images, images))),
                "ssim": m.ssim(self.float_images, images), "accuracy": q["accuracy"], "frechet": q["frechet"],
                "frechet_vs_float": m.frechet_distance(q["features"], self.float_quality["features"])}


def kernels(report: dict) -> dict:
    counts = report["integer_kernels"]
    return {"integer_gemms": counts["integer_gemms"], "float_gemms": counts["float_gemms"],
            "lowering": report["lowering_counts"], "fallbacks": len(report["fallbacks"])}


def measure_row(row: Row, model: Path, calib: Path, work: Path, sampler: Sampler, check_samples: int) -> dict:
    deployed = compile_row(row, model, calib, work)
    result = {**row.describe(), "model": model.stem, "deployed": deployed["path"],
              "compile_s": deployed["wall_s"], "peak_rss_mib": deployed["peak_rss_mib"],
              **kernels(deployed["report"])}
    if row.simulate_for_quality:
        twin = compile_row(row, model, calib, work, lowering="simulate")
        check = min(check_samples, sampler.samples)
        twin_images = sampler.images(twin["path"])
        split_images = sampler.images(deployed["path"], check)
        result["images_from"] = "simulate twin"
        result["check_samples"] = check
        result["split_vs_simulate_max_abs"] = float(np.abs(twin_images[:check] - split_images).max())
        result["split_vs_simulate_psnr_db"] = float(np.mean(sampler.metrics.psnr_per_image(
            twin_images[:check], split_images)))
        result["split_psnr_db_first"] = float(np.mean(sampler.metrics.psnr_per_image(
            sampler.float_images[:check], split_images)))
        result["simulate_psnr_db_first"] = float(np.mean(sampler.metrics.psnr_per_image(
            sampler.float_images[:check], twin_images[:check])))
        result.update(sampler.score(twin_images))
    else:
        result["images_from"] = "deployed model"
        result.update(sampler.score(sampler.images(deployed["path"])))
    return result


def measure_latency(rows: list[dict], model: Path, calib: Path, runs: int, batch_rows: int | None = None) -> None:
    """Median ms of one denoiser call on the first calibration batch (its first ``batch_rows`` samples
    when given), rows interleaved per round.

    The first row is the float model, so ``latency_vs_float`` compares side by side in one run.
    """
    import onnx

    from qcompiler.calibration.readers import load_calibration
    from qcompiler.runtimes.ort import make_session

    sessions = [make_session(row["deployed"], threads=1) for row in rows]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    batch = load_calibration(calib, onnx.load(str(model), load_external_data=False))[0]
    feeds = [{k: v[:batch_rows] for k, v in batch.feeds.items() if k in n} for n in names]
    times: list[list[float]] = [[] for _ in rows]
    for round_index in range(runs + 1):
        for offset in range(len(rows)):
            i = (round_index + offset) % len(rows)
            started = time.perf_counter()
            sessions[i].run(None, feeds[i])
            if round_index:  # round 0 warms up
                times[i].append(time.perf_counter() - started)
    base = float(np.median(times[0])) * 1e3
    for row, series in zip(rows, times):
        row["latency_ms"] = float(np.median(series)) * 1e3
        row["latency_vs_float"] = row["latency_ms"] / base


def run_model(name: str, args: argparse.Namespace, rows: list[Row] | None = None) -> list[dict]:
    """Every row of ``name`` (``rows``, else the recipes × settings of ``args`` and the ablation) measured."""
    model = models_dir() / f"{MODELS[name]}.onnx"
    if not model.exists():
        print(f"[bench] {model} is missing; skipped", flush=True)
        return []
    work = args.work / name
    (work / "rows").mkdir(parents=True, exist_ok=True)
    calib = calibration(MODELS[name], work)
    sampler = Sampler(model, args.samples, work)
    if rows is None:
        variants = ablation_rows() + fold_rows() + dmq_rows() + weight_clip_rows() if args.ablation else []
        rows = main_rows(args.settings, args.recipes) + variants
    results = [{"model": name, "row": "float", "recipe": "float", "setting": "float", "deployed": str(model),
                **{k: sampler.float_quality[k] for k in ("accuracy", "frechet")}}]
    for row in rows:
        cached = work / "rows" / f"{row.key()}.s{args.samples}.json"
        if not cached.exists():
            print(f"[bench] {name} {row.key()} ...", flush=True)
            try:
                cached.write_text(json.dumps(measure_row(row, model, calib, work, sampler, args.check_samples)))
            except RuntimeError as exc:  # a failed compile is reported, not fatal to the other rows
                print(f"[bench] {name} {row.key()} FAILED: {exc}", flush=True)
                continue
        results.append({**json.loads(cached.read_text()), "model": name})
        print(f"[bench] {name} {row.key()}: {results[-1]['psnr_db']:.2f} dB", flush=True)
    if not args.no_latency:
        measure_latency([r for r in results if "deployed" in r], model, calib, args.runs)
    return results


def main(argv: list[str] | None = None) -> int:
    from diffusion_tables import write_outputs

    args = parse_args(argv)
    results = [row for name in args.models for row in run_model(name, args)]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "samples": args.samples, "steps": 25, "guidance": 4.0}
    write_outputs(results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
