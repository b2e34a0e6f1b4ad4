"""Benchmark the ``dgq`` recipe against ``minmax`` on the bundled digits ViT and on all-MiniLM-L6-v2 (CPU).

For each model and activation width (W8A8, W8A6) it compiles four rows from the same float model
and calibration folder: ``minmax``; ``dgq``; ``dgq-fold`` (channel groups folded into W, one GEMM
per layer); ``dgq-no-log2`` (the groups alone, Softmax outputs left float like ``minmax``). Each
row gets SQNR/cosine against float on the held-out folder (``qcompiler.evaluate.evaluate``), the
integer/float GEMM kernels in ORT's optimized graph, how many quantized nodes took each lowering,
and the latency of one ``session.run`` on the first held-out file: ``--runs`` timed runs
interleaved across the rows (one run of each per round, the starting row rotating), the same
``intra_op_num_threads`` for all. Writes ``dgq.json`` and ``dgq.md`` to ``--out``.

Usage: python benchmarks/bench_dgq.py [--out benchmarks/results] [--runs 20] [--warmup 3]
       [--threads 1] [--abits 8 6] [--models digits_vit minilm] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

#: ORT ops that run a GEMM/conv on integer data, broken out in the table.
INTEGER_OPS = ("MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QLinearConv", "QGemm", "MatMulNBits")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None, help="folder for the compiled models (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per row (interleaved)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra_op_num_threads of every session (1: steadier medians on a shared machine)")
    parser.add_argument("--abits", type=int, nargs="+", default=[8, 6], choices=(8, 6, 4))
    parser.add_argument("--models", nargs="+", default=["digits_vit", "minilm"], choices=("digits_vit", "minilm"))
    return parser.parse_args(argv)


#: The ORT target's DGQ channel-group form per row (default: the per-tensor affine).
CHANNEL_GROUPS = {"dgq-split": "split", "dgq-fold": "fold"}


def recipes() -> dict:
    """Row name -> recipe (name or Recipe object); the lowering of a row is ``CHANNEL_GROUPS``'s."""
    from qcompiler.recipes import Recipe, get_recipe

    dgq = get_recipe("dgq")
    no_log2 = Recipe("dgq-no-log2", "dgq groups, Softmax outputs left float",
                     tuple(s for s in dgq.steps if s.pass_name != "log2_attention"))
    return {"minmax": "minmax", "dgq": "dgq", "dgq-split": "dgq", "dgq-fold": "dgq", "dgq-no-log2": no_log2}


def model_sources(names: list[str]) -> dict[str, dict[str, Path]]:
    sources = {}
    if "digits_vit" in names:
        from qcompiler.models import DIGITS_VIT as BUNDLED_DEFAULT

        sources["digits_vit"] = {"model": BUNDLED_DEFAULT, "calib": BUNDLED_DEFAULT.with_suffix(".calib"),
                                 "heldout": BUNDLED_DEFAULT.with_suffix(".heldout")}
    if "minilm" in names:
        from qcompiler.exporters.minilm import default_cache_dir, export_minilm

        paths = export_minilm(default_cache_dir(), calib_samples=64, heldout_samples=64)
        sources["minilm"] = {key: paths[key] for key in ("model", "calib", "heldout")}
    return sources


def build_row(name: str, recipe, source: dict, abits: int, out: Path) -> dict:
    import qcompiler
    from qcompiler.api import CompileOptions
    from qcompiler.evaluate import EvalOptions, evaluate

    started = time.perf_counter()
    result = qcompiler.quantize(source["model"], recipe, source["calib"], out,
                                CompileOptions(wbits=8, abits=abits, progress=False,
                                               channel_groups=CHANNEL_GROUPS.get(name, "affine")))
    seconds = time.perf_counter() - started
    metrics = evaluate(source["model"], out, source["heldout"], EvalOptions(per_layer=False))
    report = result.report
    kernels = report["integer_kernels"]
    nodes = [{key: record.get(key) for key in ("node", "lowering", "d_star", "group_axis", "groups", "D_channel",
                                               "D_pixel", "kernel", "reason")}
             for record in report["quantized"] if record["role"] == "activation"]
    return {"row": name, "path": str(out), "compile_s": round(seconds, 2), "overall": metrics["overall"],
            "outputs": metrics["outputs"], "integer_gemms": kernels["integer_gemms"],
            "float_gemms": kernels["float_gemms"],
            "integer_ops": {op: kernels["op_types"][op] for op in INTEGER_OPS if op in kernels["op_types"]},
            "quantized_gemms": report["quantized_gemms"], "size_mb": report["size_bytes"]["after"] / 1e6,
            "lowering_counts": dict(Counter(n["lowering"] for n in nodes)), "nodes": nodes,
            "fallbacks": report["fallbacks"], "warnings": report.get("warnings", [])}


def latency_feeds(heldout: Path) -> dict[str, np.ndarray]:
    first = min(heldout.glob("*.npz"))
    with np.load(first) as data:
        return {key: data[key] for key in data.files if not key.startswith("__")}


def measure_latency(rows: list[dict], feeds: dict, threads: int, warmup: int, runs: int) -> None:
    """Median and p90 of ``runs`` timed runs per row, interleaved round by round (start rotates)."""
    from qcompiler.runtimes.ort import make_session

    sessions = [make_session(row["path"], threads=threads) for row in rows]
    wanted = [{i.name for i in s.get_inputs()} for s in sessions]
    inputs = [{k: v for k, v in feeds.items() if k in names} for names in wanted]
    for session, feed in zip(sessions, inputs):
        for _ in range(warmup):
            session.run(None, feed)
    samples = [[] for _ in rows]
    for round_index in range(runs):
        for offset in range(len(rows)):
            index = (round_index + offset) % len(rows)
            start = time.perf_counter()
            sessions[index].run(None, inputs[index])
            samples[index].append((time.perf_counter() - start) * 1e3)
    for row, times in zip(rows, samples):
        row["latency_ms"] = {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)),
                             "samples": [round(t, 3) for t in times]}


def markdown(results: dict, meta: dict) -> str:
    lines = ["# DGQ vs minmax: accuracy, integer kernels, latency (CPU)", "",
             f"Command: `{meta['command']}`  ", f"Date (UTC): {meta['date']}  ",
             f"Machine: {meta['cpus']} CPUs (1-min load {meta['load']:.2f} at start), Python {meta['python']}, "
             f"onnxruntime {meta['onnxruntime']}  ",
             f"Latency: first held-out file, intra_op_num_threads={meta['threads']}, {meta['warmup']} warm-up runs, "
             f"{meta['runs']} timed runs per row interleaved across the rows of one table.  ",
             "Accuracy: `qcompiler.evaluate.evaluate` against the float model on the held-out folder "
             "(SQNR pooled over outputs; cosine per output).", ""]
    for key, rows in results.items():
        model, abits = key.rsplit("/", 1)
        outputs = list(rows[0]["outputs"])
        lines += [f"## {model}, W8{abits.upper()}", "",
                  "| row | SQNR dB | " + " | ".join(f"cos {o}" for o in outputs)
                  + " | int / float GEMMs | integer ops | lowering of GEMM inputs | size MB | median ms | p90 ms "
                  "| × minmax |",
                  "|---|---:|" + "---:|" * len(outputs) + "---:|---|---|---:|---:|---:|---:|"]
        base = rows[0]["latency_ms"]["median"]
        for row in rows:
            cosines = " | ".join(f"{row['outputs'][o]['cosine']:.4f}" for o in outputs)
            ops = ", ".join(f"{op} {n}" for op, n in row["integer_ops"].items())
            lowering = ", ".join(f"{name} {n}" for name, n in row["lowering_counts"].items())
            latency = row["latency_ms"]
            lines.append(f"| {row['row']} | {row['overall']['sqnr_db']:.2f} | {cosines} | {row['integer_gemms']} / "
                         f"{row['float_gemms']} | {ops} | {lowering} | {row['size_mb']:.2f} | {latency['median']:.2f} | "
                         f"{latency['p90']:.2f} "
                         f"| {latency['median'] / base:.2f} |")
        picks = Counter(n["d_star"] for n in rows[1]["nodes"] if n.get("d_star"))
        lines += ["", f"D_d picks (dgq, per quantized GEMM input): {dict(picks)}; fallbacks: "
                      f"{len(rows[1]['fallbacks'])}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime

    meta = {"command": "python benchmarks/bench_dgq.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "threads": args.threads, "runs": args.runs, "warmup": args.warmup}
    work = args.work or Path(tempfile.mkdtemp(prefix="qcompile-bench-dgq-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for model, source in model_sources(args.models).items():
        feeds = latency_feeds(source["heldout"])
        for abits in args.abits:
            rows = []
            for name, recipe in recipes().items():
                print(f"[bench_dgq] {model} W8A{abits} {name} ...", flush=True)
                rows.append(build_row(name, recipe, source, abits, work / f"{model}.{name}.w8a{abits}.onnx"))
            measure_latency(rows, feeds, args.threads, args.warmup, args.runs)
            results[f"{model}/a{abits}"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dgq.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    text = markdown(results, meta)
    (args.out / "dgq.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
