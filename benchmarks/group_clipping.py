"""How far held-out rows exceed DGQ's group ranges vs the tensor's own range (a calibration diagnostic).

For every quantized GEMM input of a float model: per-channel ranges from a fit set (every
``--every``-th row of each calibration batch is held out, the rest fit), K-means groups as
``dgq_groups`` makes them, and the worst held-out excess per tensor beyond
- its channel's group range, in that group's own steps (s_g = range/(2^b − 1)),
- the tensor's range, in per-tensor steps,
plus the step-size gain of the groups, 10·log10(s²/mean_c s_g(c)²). Large group excesses mean
the groups' narrow ranges clip on prompts/seeds outside calibration; this is what dgq_groups's
held-out validation scores.

Usage: python benchmarks/group_clipping.py MODEL.onnx CALIB_DIR [--groups 16] [--every 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.calibration.holdout import split_holdout
from qcompiler.calibration.readers import load_calibration
from qcompiler.calibration.reductions import collect_ranges
from qcompiler.calibration.statistics import StatsConfig
from qcompiler.passes.dgq_groups import _finite, kmeans_labels
from qcompiler.quant import QuantSpec, group_ranges, scale_zero_point


def gemm_inputs(proto: onnx.ModelProto) -> dict[str, int | None]:
    """Activation inputs of constant-weight Conv/MatMul/Gemm, with their channel axis (1 for Conv)."""
    readers: dict[str, set[str]] = {}
    for node in gs.import_onnx(proto).nodes:
        if node.op in ("Conv", "MatMul", "Gemm") and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            readers.setdefault(node.inputs[0].name, set()).add(node.op)
    return {name: (1 if ops == {"Conv"} else None) for name, ops in readers.items()
            if not ("Conv" in ops and ops != {"Conv"})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    proto = onnx.load(args.model)
    tensors = gemm_inputs(proto)
    split = split_holdout(load_calibration(args.calib, proto), args.every)
    if split is None:
        raise SystemExit(f"{args.calib}: too little calibration data to hold out 1 row in {args.every}")
    config = StatsConfig(progress=False, ranges_only=True)
    fit, held = (collect_ranges(args.model, part, tensors, config) for part in (split.fit, split.held_out))
    spec = QuantSpec(bits=args.bits, symmetric=False)
    rows = []
    print(f"{'tensor':70s} {'excess/tensor step':>18s} {'excess/group step':>17s} {'step gain dB':>12s}")
    for name in tensors:
        low, high = _finite(fit[name].channel_min), _finite(fit[name].channel_max)
        held_low, held_high = _finite(held[name].channel_min), _finite(held[name].channel_max)
        labels = kmeans_labels(np.stack([low, high], axis=1), args.groups)
        group_min, group_max = group_ranges(low, high, labels)
        group_step, _ = scale_zero_point(group_min, group_max, spec)
        tensor_step, _ = scale_zero_point(low.min(), high.max(), spec)
        over_group = np.maximum(held_high - group_max[labels], 0) + np.maximum(group_min[labels] - held_low, 0)
        over_tensor = np.maximum(held_high - high.max(), 0) + np.maximum(low.min() - held_low, 0)
        row = {"tensor": name, "excess_tensor_steps": float((over_tensor / tensor_step).max()),
               "excess_group_steps": float((over_group / group_step[labels]).max()),
               "step_gain_db": float(10 * np.log10(tensor_step**2 / np.mean(group_step[labels] ** 2)))}
        rows.append(row)
        print(f"{name[-70:]:70s} {row['excess_tensor_steps']:18.1f} {row['excess_group_steps']:17.1f} "
              f"{row['step_gain_db']:12.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "calib": args.calib, "groups": args.groups, "every": args.every,
                       "held_out_rows": split.held_out_count, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
