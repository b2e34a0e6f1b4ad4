"""Deploy compiled models into a Triton repository, serve them in a real Triton, check and load-test them.

    python benchmarks/bench_triton.py --model unet=unet_mnist.minmax.w8a8.onnx:models/unet_mnist.calib \\
        --model minilm=minilm.minmax.w8a8.onnx:build/minilm/heldout [--clients 8 --requests 50]

For each ``NAME=MODEL:DATA`` (DATA: a folder of .npz feeds; its first sample, batch 1, is the
request): ``qcompile deploy``'s ``write_repository`` into ``--work/repo``, Triton 2.51 started
on it (``qcompiler.deploy.pytriton_env``: PyTriton's server, Python backend running an ORT
session of the repository's model), one request compared with a direct ORT run of the same
file, then ``--clients`` concurrent HTTP clients × ``--requests`` requests each (tritonclient),
reporting p50/p99 latency, throughput and failures; beside it the direct ORT latency of the
same request in this process (sequential, ``--threads`` threads) so the server's overhead shows.
Writes ``triton.json`` and ``triton.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompiler.deploy import pytriton_env
from qcompiler.deploy.client import infer, load_test
from qcompiler.deploy.triton import TritonOptions, read_config, write_repository


def first_request(data: Path) -> dict[str, np.ndarray]:
    with np.load(min(data.glob("*.npz"))) as npz:
        return {key: npz[key][:1] for key in npz.files if not key.startswith("__")}


def direct_latency_ms(model: Path, feeds: dict, threads: int, runs: int = 30) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench(name: str, model: Path, data: Path, args) -> dict:
    import onnxruntime as ort
    from tritonclient.http import InferenceServerClient

    feeds = first_request(data)
    repo = args.work / "repo"
    folder = write_repository(model, repo, TritonOptions(name=name, instances=args.instances,
                                                          intra_op_threads=args.threads, force=True))
    config = read_config(folder / "config.pbtxt")
    direct = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    started = time.perf_counter()
    with pytriton_env.PyTritonServer(folder, args.work / f"{name}.tritonserver.log") as server:
        startup = time.perf_counter() - started
        client = InferenceServerClient(server.url, network_timeout=120.0)
        served = infer(client, config, feeds)
        client.close()
        max_rel = max(float(np.abs(served[entry.name] - value).max() / max(np.abs(value).max(), 1e-30))
                      for entry, value in zip(config.output, direct))
        report = load_test(server.url, config, feeds, clients=args.clients, requests=args.requests)
    row = {"name": name, "model": str(model), "max_batch_size": config.max_batch_size,
           "instances": args.instances, "threads_per_instance": args.threads,
           "request": {key: list(value.shape) for key, value in feeds.items()},
           "server_startup_s": round(startup, 1), "max_relative_difference_vs_ort": max_rel,
           "direct_ort_p50_ms": direct_latency_ms(model, feeds, args.threads), **report.as_dict(),
           "load_average_1min": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], args) -> str:
    setting = (f"Triton 2.51 (PyTriton {pytriton_env.PYTRITON}, Python backend running an ORT session of the "
               f"repository's model), {platform.machine()}, {args.instances} instance(s) × {args.threads} ORT "
               f"thread(s), dynamic batching, {args.clients} clients × {args.requests} requests, "
               "batch-1 requests over HTTP on 127.0.0.1. Latencies depend on what else the machine runs: "
               "the 1-minute load average at the end of each row is given.")
    header = ("| model | request | max rel. diff vs ORT | failed / sent | p50 ms | p99 ms | throughput req/s "
              "| direct ORT p50 ms | load avg / CPUs |")
    lines = [f"# Triton serving (`{' '.join(sys.argv)}`)", "", setting, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        request = ", ".join(f"{key} {'×'.join(map(str, shape))}" for key, shape in row["request"].items())
        lines.append(f"| {row['name']} | {request} | {row['max_relative_difference_vs_ort']:.1e} | "
                     f"{row['failed']} / {row['clients'] * row['requests_per_client']} | {row['p50_ms']:.1f} | "
                     f"{row['p99_ms']:.1f} | {row['throughput_rps']:.1f} | {row['direct_ort_p50_ms']:.1f} | "
                     f"{row['load_average_1min']} / {row['cpus']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL:DATA")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--instances", type=int, default=2, help="Triton model instances (one ORT session each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ORT intra-op threads per instance (1: spinning thread pools collapse on a busy machine)")
    parser.add_argument("--work", type=Path, default=Path("build/triton"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.model:
        name, rest = spec.split("=", 1)
        model, data = rest.rsplit(":", 1)
        rows.append(bench(name, Path(model), Path(data), args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "triton.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "triton.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0 if all(row["failed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
