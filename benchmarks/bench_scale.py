"""Real-size compiles: SD-1.5's UNet and PixArt-α's transformer through qcompile and ORT's quantize_static.

For each model (built by ``scale_models.py`` from its configuration with random weights, external
data, 4 calibration files of 512-px latents) and each compiler (qcompile recipes, and ONNX
Runtime's ``quantize_static`` as the baseline), one subprocess per compile under
``/usr/bin/time -v``: wall time and peak RSS of the whole process, from the OS. Then each output
is loaded in ORT from its path and timed at one thread beside the float model (median of
``--repeats`` runs, same process, interleaved), and its integer kernels are counted in ORT's
optimized graph. Random weights prove memory, time and structure, not quality.

    python benchmarks/bench_scale.py --work /tmp/scale            # both models, minmax/osplus/dgq + ORT
    python benchmarks/bench_scale.py --work /tmp/scale --model sd15-unet --recipe minmax

Writes ``benchmarks/results/scale.{json,md}`` (``--results NAME`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ORT_STATIC = """
import sys, numpy as np, glob
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationDataReader
class Reader(CalibrationDataReader):
    def __init__(self, files): self.files = iter(files)
    def get_next(self):
        f = next(self.files, None)
        return None if f is None else {k: v for k, v in np.load(f).items() if not k.startswith('__')}
quantize_static(sys.argv[1], sys.argv[3], Reader(sorted(glob.glob(sys.argv[2] + '/*.npz'))),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, use_external_data_format=True)
"""


class LoadSampler:
    """The 1-minute load average (``os.getloadavg``) every ``every`` seconds while a command runs: wall
    times on a shared machine mean little without it (2 cores here; load 2 = both busy)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"start": round(self.samples[0], 2), "end": round(self.samples[-1], 2),
                "max": round(max(self.samples), 2), "mean": round(sum(self.samples) / len(self.samples), 2)}


def _timed(command: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v; wall seconds, peak RSS bytes and exit code from the OS, and the
    load average through the run."""
    started = time.perf_counter()
    with open(log, "w") as handle, LoadSampler() as load:
        code = subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"exit_code": code, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "load_avg": load.summary(),
            "log": str(log)}


def _size(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0) if path.exists() else 0


def compile_all(folder: Path, name: str, recipes: list[str], out: Path, ort_static: bool = True) -> list[dict]:
    model, calib = folder / f"{name}.onnx", folder / "calib"
    rows = []
    for recipe in recipes:
        output = out / f"{name}.{recipe}.onnx"
        print(f"{name}: qcompile --recipe {recipe} ...", flush=True)
        row = {"model": name, "compiler": f"qcompile {recipe}", "output": str(output),
               **_timed([sys.executable, "-m", "qcompiler.cli.main", str(model), "--recipe", recipe,
                         "--calib", str(calib), "-o", str(output), "--quiet", "-v"], out / f"{name}.{recipe}.log")}
        # Splits within a pass that its -v log states (shift_scale: one calibration pass, then the searches).
        split = re.search(r"ranges and rows ([\d.]+) s, threshold searches and folds ([\d.]+) s",
                          Path(row["log"]).read_text())
        if split:
            row["shift_scale_split_s"] = {"ranges_and_rows": float(split.group(1)),
                                          "searches_and_folds": float(split.group(2))}
        report = Path(f"{output}.report.json")
        if report.exists():
            data = json.loads(report.read_text())
            row.update(passes={p["name"]: round(p["seconds"], 1) for p in data["passes"]},
                       quantized_gemms=data["quantized_gemms"], integer_gemms=data["integer_kernels"]["integer_gemms"],
                       report_peak_rss_bytes=data.get("peak_rss_bytes"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not ort_static:
        return rows
    output = out / f"{name}.ort_static.onnx"
    print(f"{name}: onnxruntime quantize_static ...", flush=True)
    row = {"model": name, "compiler": "ORT quantize_static", "output": str(output),
           **_timed([sys.executable, "-c", ORT_STATIC, str(model), str(calib), str(output)],
                    out / f"{name}.ort_static.log")}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def latency(folder: Path, name: str, rows: list[dict], repeats: int) -> float:
    """Median one-thread latency of the float model and of every output that exists, interleaved."""
    from qcompiler.runtimes.ort import count_kernels, make_session

    feeds = {k: v for k, v in np.load(folder / "calib" / "000.npz").items() if not k.startswith("__")}
    sessions = {"float": make_session(folder / f"{name}.onnx", threads=1)}
    for row in rows:
        if row["exit_code"] == 0 and Path(row["output"]).exists():
            sessions[row["compiler"]] = make_session(row["output"], threads=1)
            row["output_bytes"] = _size(Path(row["output"]))
            if "integer_gemms" not in row:
                row["integer_gemms"] = count_kernels(row["output"]).integer_gemms
    times: dict[str, list[float]] = {key: [] for key in sessions}
    with LoadSampler() as load:
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for key, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feeds)
                times[key].append(time.perf_counter() - started)
    float_s = float(np.median(times["float"][1:]))
    for row in rows:
        if row["compiler"] in times:
            row["latency_s"] = round(float(np.median(times[row["compiler"]][1:])), 3)
            row["speedup_vs_float"] = round(float_s / row["latency_s"], 2)
            row["latency_load_avg"] = load.summary()
    return float_s


def _load(summary: dict | None) -> str:
    return f"{summary['mean']:.1f} ({summary['start']:.1f}–{summary['max']:.1f})" if summary else "–"


def table(results: list[dict]) -> str:
    """The comparison table, then each qcompile row's per-pass seconds. Load: the 1-minute load average
    through the compile (mean, and start–max); 2 cores, so above ~1 the wall time includes waiting."""
    lines = ["| model | compiler | exit | wall s | load avg during compile | peak RSS GB | RSS / model size | output MB "
             "| speed-up vs float (1 thread) | load avg during timing | integer GEMMs / quantized |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in results:
        for row in model["rows"]:
            rss = row.get("peak_rss_bytes") or 0
            lines.append(f"| {row['model']} | {row['compiler']} | {row['exit_code']} | {row['wall_s']} | "
                         f"{_load(row.get('load_avg'))} | {rss / 1e9:.2f} | {rss / model['model_bytes']:.2f} | "
                         f"{row.get('output_bytes', 0) / 1e6:.0f} | {row.get('speedup_vs_float', '–')} | "
                         f"{_load(row.get('latency_load_avg'))} | {row.get('integer_gemms', '–')} / "
                         f"{row.get('quantized_gemms', '–')} |")
    lines += ["", "Per-pass seconds (the compile report's):", "", "| model | compiler | passes |", "|---|---|---|"]
    for model in results:
        for row in model["rows"]:
            if row.get("passes"):
                passes = ", ".join(f"{name} {seconds}" for name, seconds in row["passes"].items())
                if row.get("shift_scale_split_s"):
                    passes += " (shift_scale: ranges and rows {ranges_and_rows}, searches and folds " \
                              "{searches_and_folds})".format(**row["shift_scale_split_s"])
                lines.append(f"| {row['model']} | {row['compiler']} | {passes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the exported models and outputs")
    parser.add_argument("--model", action="append", choices=["sd15-unet", "pixart-512"])
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ort-static", action="store_true",
                        help="do not run ORT's quantize_static beside (it needs > 24 GB on these models)")
    parser.add_argument("--results", default="scale", help="results/<name>.{json,md}")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from scale_models import build

    results = []
    for name in args.model or ["sd15-unet", "pixart-512"]:
        folder = args.work / name
        if not (folder / f"{name}.onnx").exists():
            build(name, args.work, latent=64, calib_files=4)
        out = args.work / "out"
        out.mkdir(exist_ok=True)
        model_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.suffix == ".json")
        rows = compile_all(folder, name, args.recipe or ["minmax", "osplus", "dgq"], out, not args.skip_ort_static)
        float_s = latency(folder, name, rows, args.repeats)
        results.append({"model": name, "model_bytes": model_bytes, "float_latency_s": round(float_s, 3), "rows": rows})
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.results}.json").write_text(json.dumps(results, indent=1))
        (RESULTS / f"{args.results}.md").write_text(table(results))
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
