"""Paired latency ratios of deployed models against a baseline, robust to a drifting machine.

Each round runs every model once on the same inputs (1 intra-op thread, the order rotating by round)
and divides each model's time by the baseline's (the first model) in that round; the table gives the
median of those per-round ratios with their interquartile range. On a shared or virtualised host
whose speed drifts by tens of percent over a minute, medians of separate runs can disagree by ±10 %
between models with identical graphs; paired ratios cancel the drift.

Usage: python benchmarks/latency_pairs.py --feeds BATCH.npz --runs 100 --json OUT.json \
           BASELINE.onnx MODEL.onnx [MODEL.onnx ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def paired_times(paths: list[Path], feeds: dict, runs: int, warmup: int = 3) -> np.ndarray:
    """Seconds per (round, model), models rotated within each round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
    inputs = [{i.name: feeds[i.name] for i in s.get_inputs()} for s in sessions]
    for _ in range(warmup):
        for session, feed in zip(sessions, inputs):
            session.run(None, feed)
    times = np.zeros((runs, len(sessions)))
    for round_index in range(runs):
        for offset in range(len(sessions)):
            j = (round_index + offset) % len(sessions)
            start = time.perf_counter()
            sessions[j].run(None, inputs[j])
            times[round_index, j] = time.perf_counter() - start
    return times


def summarize(paths: list[Path], times: np.ndarray) -> list[dict]:
    ratios = times / times[:, :1]
    rows = []
    for j, path in enumerate(paths):
        q1, median, q3 = np.percentile(ratios[:, j], [25, 50, 75])
        rows.append({"model": str(path), "median_ms": float(np.median(times[:, j]) * 1e3),
                     "ratio_median": float(median), "ratio_q1": float(q1), "ratio_q3": float(q3)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="the baseline first")
    parser.add_argument("--feeds", type=Path, required=True, help="an .npz with the models' inputs")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with np.load(args.feeds) as data:
        feeds = {k: data[k] for k in data.files}
    load = os.getloadavg()[0]
    rows = summarize(args.models, paired_times(args.models, feeds, args.runs))
    print(f"| model | median ms | × {args.models[0].name} (median of {args.runs} paired rounds, IQR) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {Path(row['model']).name} | {row['median_ms']:.1f} | {row['ratio_median']:.3f} "
              f"({row['ratio_q1']:.3f}–{row['ratio_q3']:.3f}) |")
    if args.json:
        args.json.write_text(json.dumps({"feeds": str(args.feeds), "runs": args.runs, "load_at_start": load,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
