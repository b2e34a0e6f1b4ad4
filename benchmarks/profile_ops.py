"""Where ORT spends a denoiser call: kernel time per op type for one or more compiled models.

Runs each model on the first batch of a calibration folder with ORT's profiler (CPU, one intra-op
thread, ``--runs`` calls after one warm-up) and prints the mean ms per call by op type, largest
first; ``--json`` writes the same numbers. Used to explain latency rows of ``bench_diffusion``
(e.g. DGQ's ConvInteger vs minmax's QLinearConv).

Usage: python benchmarks/profile_ops.py MODEL.onnx [MODEL.onnx ...] --calib models/unet_mnist.calib
       [--reference models/unet_mnist.onnx] [--runs 3] [--top 8] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path


def profile(model: Path, feeds: dict, runs: int) -> dict[str, float]:
    """Mean kernel ms per call, by op type (ORT's ``*_kernel_time`` node events)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        inputs = {k: v for k, v in feeds.items() if k in names}
        session.run(None, inputs)  # warm-up; also profiled, its events (the first call's) are skipped below
        for _ in range(runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter = Counter()
    kernel_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    calls = runs + 1
    events_before = len(kernel_events) // calls  # the warm-up call's events come first
    for event in kernel_events[events_before:]:
        per_op[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    return dict(per_op)


def main(argv: list[str] | None = None) -> int:
    import onnx

    from qcompiler.calibration.readers import load_calibration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--reference", type=Path, help="the float model the calibration matches (default: first)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    reference = args.reference or args.models[0]
    batch = load_calibration(args.calib, onnx.load(str(reference), load_external_data=False))[0]
    results = {}
    for model in args.models:
        per_op = profile(model, batch.feeds, args.runs)
        results[str(model)] = per_op
        top = sorted(per_op.items(), key=lambda item: -item[1])[:args.top]
        print(f"{model.name}: {sum(per_op.values()):.0f} ms of kernels per call (batch {batch.batch_size})")
        for op, ms in top:
            print(f"  {op:24s} {ms:8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"calib": str(args.calib), "runs": args.runs, "ms_per_op": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
