"""Lowering benchmark: every recipe's deployed output beside minmax's, at the same bits, in one run.

For each model (``unet``, ``dit`` of the zoo; ``unet_b``, ``unet_c``, the held-out zoo UNets, on request) and
setting (W8A8, W8A6, W4A8) the rows are minmax,
smoothquant, osplus, dgq (default lowering: channel groups as one per-tensor affine, one integer
GEMM each), dgq with ``--channel-groups split`` (K partial integer GEMMs: the bit-exact reference)
dmq (W4 only) and, at W8A8, dgq with per-timestep ranges (simulated on ORT). Each row is compiled by the ``qcompile`` CLI in a child process (wall time and
peak RSS from GNU time) on a subsampled calibration set (every ``--calib-stride``-th row of every
timestep file, so all timesteps stay represented), then measured:

- latency: one denoiser call on the first calibration batch, 1 intra-op thread, ``--runs`` rounds
  with all rows of a model interleaved (float first); ×minmax is against minmax at the same bits;
- size: the output file (+ external data) against minmax's at the same bits;
- kernels: integer / quantized GEMMs in ORT's optimized graph (from the compile report);
- denoiser SQNR: one call's output vs float on every 3rd calibration file, every row (the
  lowering's arithmetic without the trajectory);
- quality: PSNR of the final images vs the float model's on ``--samples`` prompts and seeds (DDIM
  25 steps, guidance 4), sampled from the deployed model, for minmax, dgq and dgq split (the
  question here is dgq's default lowering against its exact reference; every recipe's quality is
  ``bench_diffusion.py``'s table). ``--quality-all`` samples every row.
MiniLM's rows (every recipe's latency beside minmax's) come from ``bench_minilm.py --recipes all``.
Rows are cached in ``--work``; writes ``lowering.json``, ``lowering.md`` and ``lowering.png``.

Usage: python benchmarks/bench_lowering.py [--models unet unet_b unet_c dit] [--settings w8a8 w8a6 w4a8]
       [--samples 16] [--runs 10] [--work build/bench_lowering]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import MODELS, Sampler, calibration, compile_row, measure_latency, models_dir  # noqa: E402
from diffusion_rows import Row  # noqa: E402
from lowering_tables import write_outputs  # noqa: E402

RECIPES = ("minmax", "smoothquant", "osplus", "dgq")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "dit"], choices=sorted(MODELS))
    parser.add_argument("--settings", nargs="+", default=["w8a8", "w8a6", "w4a8"])
    parser.add_argument("--samples", type=int, default=16, help="images per row (seeds 0..N-1)")
    parser.add_argument("--runs", type=int, default=10, help="timed denoiser calls per row (interleaved)")
    parser.add_argument("--quality-all", action="store_true", help="sample images for every row")
    parser.add_argument("--calib-stride", type=int, default=4, help="keep every N-th row of each calibration file")
    parser.add_argument("--work", type=Path, default=Path("build/bench_lowering"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def rows_for(settings: list[str]) -> list[Row]:
    rows = []
    for setting in settings:
        wbits, abits = int(setting[1]), int(setting[3])
        rows += [Row(recipe, wbits, abits) for recipe in RECIPES]
        rows.append(Row("dgq", wbits, abits, "split", ("--channel-groups", "split")))
        if setting == "w8a8":  # per-timestep ranges: simulated on ORT; what that costs
            rows.append(Row("dgq", wbits, abits, "per-timestep", ("--set", "dgq_groups.per_timestep=true")))
        if wbits == 4:
            rows.append(Row("dmq", wbits, abits))
    return rows


def subsample(calib: Path, work: Path, stride: int) -> Path:
    """Every ``stride``-th row of every calibration file (metadata rows kept aligned)."""
    folder = work / f"calib_stride{stride}"
    if folder.is_dir():
        return folder
    staging = work / f".calib_stride{stride}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(calib.glob("*.npz")):
        with np.load(path) as data:
            np.savez(staging / path.name, **{k: v[::stride] if v.ndim else v for k, v in data.items()})
    staging.rename(folder)
    return folder


def size_bytes(report: dict) -> int:
    return int(report["size_bytes"]["after"])


def measure(row: Row, model: Path, calib: Path, work: Path, sampler: Sampler, quality: bool) -> dict:
    compiled = compile_row(row, model, calib, work)
    report = compiled["report"]
    psnr, per_image = None, None
    if quality:
        images = sampler.images(compiled["path"])
        per_image = [float(v) for v in sampler.metrics.psnr_per_image(sampler.float_images, images)]
        psnr = float(np.mean(per_image))
    return {**row.describe(), "deployed": compiled["path"], "compile_s": compiled["wall_s"],
            "peak_rss_mib": compiled["peak_rss_mib"], "size_bytes": size_bytes(report),
            "integer_gemms": report["integer_kernels"]["integer_gemms"], "quantized_gemms": report["quantized_gemms"],
            "float_gemms": report["integer_kernels"]["float_gemms"], "simulated": len(report.get("simulated", [])),
            "lowering": report["lowering_counts"], "psnr_db": psnr, "psnr_per_image": per_image}


def denoiser_sqnr(results: list[dict], calib: Path, every: int = 3) -> None:
    """SQNR (dB) of one denoiser call against float, pooled over every ``every``-th calibration file
    (timesteps across the schedule): the lowering's arithmetic without the trajectory, whose 25
    chained steps amplify differences of a few hundredths of a dB into ±1 dB of final-image PSNR."""
    from qcompiler.quant import sqnr_db
    from qcompiler.runtimes.ort import make_session

    files = sorted(calib.glob("*.npz"))[1::every]
    reference = make_session(results[0]["deployed"], threads=1)
    names = [i.name for i in reference.get_inputs()]
    feeds = []
    for path in files:
        with np.load(path) as data:
            feeds.append({k: data[k] for k in names})
    expected = np.concatenate([reference.run(None, f)[0].ravel() for f in feeds])
    for row in results[1:]:
        session = make_session(row["deployed"], threads=1)
        row["denoiser_sqnr_db"] = sqnr_db(expected, np.concatenate([session.run(None, f)[0].ravel() for f in feeds]))


def paired_standard_error(values, reference) -> float | None:
    """Standard error of the mean per-image difference (same seeds and prompts in both lists).

    The sampler's 25 chained steps make one image's PSNR swing by about a dB between two nearly
    equal models, so a difference of means needs its spread beside it to be read."""
    if not values or not reference or len(values) != len(reference) or len(values) < 2:
        return None
    diff = np.asarray(values) - np.asarray(reference)
    return float(diff.std(ddof=1) / np.sqrt(diff.size))


def relative_to_minmax(results: list[dict]) -> None:
    """× minmax (latency, size) at the same setting, and dgq's PSNR against its split reference."""
    by_key = {(r["setting"], r["recipe"], r.get("variant", "")): r for r in results}
    for row in results:
        minmax = by_key.get((row["setting"], "minmax", ""))
        if minmax and "latency_ms" in row:
            row["latency_vs_minmax"] = row["latency_ms"] / minmax["latency_ms"]
            row["size_vs_minmax"] = row["size_bytes"] / minmax["size_bytes"]
        split = by_key.get((row["setting"], "dgq", "split"))
        if row["recipe"] == "dgq" and not row.get("variant") and split and row.get("psnr_db") is not None:
            row["psnr_vs_split_db"] = row["psnr_db"] - split["psnr_db"]
            row["psnr_vs_split_se_db"] = paired_standard_error(row.get("psnr_per_image"), split.get("psnr_per_image"))
        if row["recipe"] == "dgq" and not row.get("variant") and split and "denoiser_sqnr_db" in row:
            row["sqnr_vs_split_db"] = row["denoiser_sqnr_db"] - split["denoiser_sqnr_db"]


def run_model(name: str, args) -> list[dict]:
    model = models_dir() / f"{MODELS[name]}.onnx"
    work = args.work / name
    (work / "rows").mkdir(parents=True, exist_ok=True)
    calib = subsample(calibration(MODELS[name], work), work, args.calib_stride)
    sampler = Sampler(model, args.samples, work)
    results = [{"model": name, "row": "float", "recipe": "float", "setting": "float", "variant": "",
                "deployed": str(model), "size_bytes": model.stat().st_size}]
    for row in rows_for(args.settings):
        cached = work / "rows" / f"{row.key()}.s{args.samples}.json"
        if not cached.exists():
            print(f"[bench] {name} {row.key()} ...", flush=True)
            quality = args.quality_all or (row.recipe in ("minmax", "dgq") and row.variant in ("", "split"))
            cached.write_text(json.dumps(measure(row, model, calib, work, sampler, quality)))
        results.append({**json.loads(cached.read_text()), "model": name})
        print(f"[bench] {name} {row.key()}: {results[-1]['psnr_db']} dB", flush=True)
    measure_latency(results, model, calib, args.runs)
    denoiser_sqnr(results, calib)
    relative_to_minmax(results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [row for name in args.models for row in run_model(name, args)]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "samples": args.samples, "calib_stride": args.calib_stride, "runs": args.runs}
    write_outputs(results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
