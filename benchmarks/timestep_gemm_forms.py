"""One Linear with a per-timestep table, lowered both ways: where does the integer form pay on ORT's CPU?

For x (32, T, K) → MatMul(W [K, N]) + b with one (s, z) per batch row gathered by its timestep
(``tests/lowering/test_timestep_integer.py``'s toy graph and plan), the two lowerings of the ORT
target: "simulate" (per-row QuantizeLinear → DequantizeLinear, float MatMul) and "integer"
(per-row QuantizeLinear, MatMulIntegerToFloat, × s − s·z·colsum(Ŵ) on the output). Median of
``--runs`` calls each, interleaved, one thread. ``--timestep-groups auto`` takes the integer form
from the reduction width where it wins here (``timestep_integer.MIN_INTEGER_REDUCTION``).

Usage: python benchmarks/timestep_gemm_forms.py [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from result_files import write_table  # noqa: E402

#: (K, N, tokens): the zoo UNet's Linear widths (K 32–256), the zoo DiT's (96–384), SD-1.5-sized ones.
SHAPES = [(32, 32, 256), (64, 64, 64), (64, 64, 256), (64, 256, 256), (96, 96, 64), (96, 384, 64), (128, 128, 64),
          (128, 512, 64), (256, 256, 64), (512, 128, 64), (320, 320, 256), (640, 2560, 64), (1280, 1280, 64)]


def time_shape(k: int, n: int, tokens: int, runs: int) -> dict:
    import tests.lowering.test_timestep_integer as toy
    from qcompiler.runtimes.ort import make_session

    model = toy.linear_model(channels=k, outputs=n, tokens=tokens)
    plan = toy.timestep_plan("channel", np.zeros(k, int), -1)
    feeds = {"x": np.random.default_rng(0).standard_normal((32, tokens, k)).astype(np.float32),
             "timestep": np.full(32, 400.0, np.float32)}
    sessions = {mode: make_session(toy.lowered(model, plan, mode).model(), threads=1) for mode in ("simulate", "integer")}
    times: dict[str, list[float]] = {mode: [] for mode in sessions}
    for round_index in range(runs + 3):
        for mode, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            if round_index >= 3:
                times[mode].append(time.perf_counter() - started)
    simulate, integer = (float(np.median(times[m])) * 1e3 for m in ("simulate", "integer"))
    return {"K": k, "N": n, "M": 32 * tokens, "simulate_ms": simulate, "integer_ms": integer,
            "integer_vs_simulate": integer / simulate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = [time_shape(k, n, tokens, args.runs) for k, n, tokens in SHAPES]
    lines = ["# One Linear with a per-timestep table: integer vs simulated lowering", "",
             f"`python benchmarks/timestep_gemm_forms.py --runs {args.runs}`: x (M = 32·T, K) · W [K, N] + b, one (s, z) "
             "per batch row; median ms of one call, 1 thread, the two forms interleaved.", "",
             "| K | N | M | simulate ms | integer ms | integer / simulate |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['K']} | {r['N']} | {r['M']} | {r['simulate_ms']:.2f} | {r['integer_ms']:.2f} | "
              f"{r['integer_vs_simulate']:.2f} |" for r in rows]
    write_table(args.out, "timestep_gemm_forms", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
