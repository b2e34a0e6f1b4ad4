"""Calibration on a local dask cluster: 1 vs 2 worker processes (and in-process), wall time and peak memory.

Each compile runs in its own subprocess (``qcompile MODEL --recipe R [--workers N]``). Wall time
is the subprocess's; the driver's peak RSS and each worker's are read from the compile report
(``peak_rss_bytes``, ``calibration_cluster.worker_peak_rss_bytes``: ``getrusage`` of each process).
A worker's RSS counts the pages of the memory-mapped model it touched: file pages that the OS
shares between workers on one machine. Every output is compared byte for byte with the in-process
one (the cluster must not change the result).

    python benchmarks/scale_models.py --model sd15-unet --out /work/scale      # 3.4 GB, ~75 s
    python benchmarks/bench_distributed.py --model /work/scale/sd15-unet/sd15-unet.onnx \\
        --calib /work/scale/sd15-unet/calib --recipe minmax
    python benchmarks/bench_distributed.py --model models/unet_mnist.onnx --calib-limit 160  # small

Writes ``benchmarks/results/distributed.{json,md}`` (``--results NAME`` for another name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def compile_once(model: Path, calib: Path | None, recipe: str, workers: int, folder: Path,
                 extra: list[str]) -> dict:
    out = folder / f"workers{workers}" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "qcompiler.cli.main", str(model), "--recipe", recipe, "-o", str(out),
               "--quiet", *(["--calib", str(calib)] if calib else []), *extra]
    if workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"compile with {workers} worker(s) failed: {done.stderr.strip()[-400:]}")
    report = json.loads(Path(f"{out}.report.json").read_text())
    cluster = report.get("calibration_cluster") or {}
    calibrate = sum(p["seconds"] for p in report["passes"] if p["name"] != "lower")
    return {"workers": workers, "wall_s": round(wall, 1), "passes_s": round(calibrate, 1),
            "driver_peak_rss_bytes": report["peak_rss_bytes"],
            "worker_peak_rss_bytes": list(cluster.get("worker_peak_rss_bytes", {}).values()),
            "samples_merged": [c["samples_merged"] for c in cluster.get("captures", [])],
            "calibration_samples": report["calibration_samples"], "output": str(out)}


def digest(path: Path) -> str:
    """sha256 of the model file and its external data (streamed: outputs may be GBs)."""
    sha = hashlib.sha256()
    for file in (path, Path(f"{path}.data")):
        if file.exists():
            with open(file, "rb") as handle:
                while block := handle.read(1 << 24):
                    sha.update(block)
    return sha.hexdigest()


def gib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def table(rows: list[dict], model: Path, recipe: str, command: str) -> str:
    lines = [f"Calibration on a local dask cluster: `{model.name}`, recipe `{recipe}` (`{command}`)",
             "", "| workers | wall s | passes s | driver peak RSS GiB | worker peak RSS GiB "
             "| samples merged per capture | output = in-process |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        workers = "in-process" if not row["workers"] else str(row["workers"])
        per_worker = ", ".join(gib(v) for v in row["worker_peak_rss_bytes"]) or "–"
        merged = ", ".join(map(str, row["samples_merged"])) or "–"
        lines.append(f"| {workers} | {row['wall_s']} | {row['passes_s']} | {gib(row['driver_peak_rss_bytes'])} | "
                     f"{per_worker} | {merged} | {row['same_output']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/unet_mnist.onnx"))
    parser.add_argument("--calib", type=Path, help="calibration folder (default: <model stem>.calib beside it)")
    parser.add_argument("--recipe", default="minmax")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = in-process (the reference)")
    parser.add_argument("--calib-limit", type=int)
    parser.add_argument("--work", type=Path, help="folder for the outputs (default: a temporary one)")
    parser.add_argument("--results", default="distributed")
    args = parser.parse_args(argv)
    extra = ["--calib-limit", str(args.calib_limit)] if args.calib_limit else []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-", dir=args.work) as tmp:
        rows = []
        for workers in dict.fromkeys([0, *args.workers]):  # the in-process run first: the reference
            rows.append(compile_once(args.model, args.calib, args.recipe, workers, Path(tmp), extra))
            print(f"workers {workers}: {rows[-1]['wall_s']} s", file=sys.stderr)
        reference = digest(Path(rows[0]["output"]))
        for row in rows:
            row["same_output"] = digest(Path(row.pop("output"))) == reference
    command = " ".join(["python", "benchmarks/bench_distributed.py", *(argv if argv is not None else sys.argv[1:])])
    text = table(rows, args.model, args.recipe, command)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(
        {"model": str(args.model), "recipe": args.recipe, "calib_limit": args.calib_limit, "rows": rows}, indent=1))
    (RESULTS / f"{args.results}.md").write_text(text)
    return 0 if all(row["same_output"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
