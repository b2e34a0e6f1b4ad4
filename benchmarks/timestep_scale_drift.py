"""Would one per-timestep factor on fixed group ratios keep the per-timestep lookup's gain? (No, on the zoo.)

DGQ's K channel groups run on one integer GEMM only when their scales keep fixed ratios r_g (the
channel affine folds diag(r) into W). A per-timestep table of that form is σ_g(t) = λ(t)·r_g with
λ(t) = max_g s_g(t)/r_g (every group's range still fits at t) and r_g the geometric mean of s_g(t)
over t. This reads the (T, K) scale tables a ``dgq --per-timestep`` model gathers and prints, per
calibrated timestep, how much coarser than the lookup's own s_g(t) that form's grids would be
(σ_g(t)/s_g(t), median and 90th percentile over the tensors of each tensor's mean over groups),
next to the static ranges' (max_t s_g(t)/s_g(t)).

Usage: python benchmarks/timestep_scale_drift.py LOOKUP_MODEL.onnx [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def scale_tables(path: Path) -> list[np.ndarray]:
    """The float (T, K > 1) tables a Gather reads whose values are positive and not all integers (the scales)."""
    model = onnx.load(str(path))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tables = []
    for node in model.graph.node:
        table = constants.get(node.input[0]) if node.op_type == "Gather" else None
        if (table is not None and table.ndim == 2 and table.dtype == np.float32 and table.shape[1] > 1
                and table.shape[0] > 1 and np.all(table > 0) and not np.allclose(table, np.rint(table))):
            tables.append(table)
    return tables


def coarsening(tables: list[np.ndarray]) -> list[dict]:
    rows = []
    for t in range(tables[0].shape[0]):
        shared, static = [], []
        for table in tables:
            logs = np.log(table.astype(np.float64))
            ratio = logs.mean(axis=0)
            factor = (logs - ratio).max(axis=1)
            shared.append(float(np.exp(factor[t] + ratio - logs[t]).mean()))
            static.append(float(np.exp(logs.max(axis=0) - logs[t]).mean()))
        rows.append({"index": t, "shared_median": float(np.median(shared)), "shared_p90": float(np.quantile(shared, 0.9)),
                     "static_median": float(np.median(static)), "static_p90": float(np.quantile(static, 0.9))})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    tables = scale_tables(args.model)
    if not tables:
        print(f"{args.model}: no per-timestep scale tables with K > 1 groups")
        return 2
    rows = coarsening(tables)
    print(f"{len(tables)} tables of shape {tables[0].shape} (timesteps × groups); grids coarser than the lookup's, "
          "× (median / p90 over tensors)")
    print("| timestep index | one factor, fixed ratios | static ranges |\n|---:|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['shared_median']:.2f} / {r['shared_p90']:.2f} | "
              f"{r['static_median']:.2f} / {r['static_p90']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "tensors": len(tables), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
