"""One denoiser call's error: SQNR (dB) of each model's output against the float model on calibration files.

Separates a lowering's arithmetic from what sampling does with it: the same inputs (one or more
``.npz`` calibration files, e.g. one per timestep), one call each, no trajectory. Prints a table
and optionally writes JSON.

Usage: python benchmarks/denoiser_sqnr.py FLOAT.onnx QUANT.onnx [QUANT.onnx ...] --calib FILE.npz [FILE.npz ...]
       [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from qcompiler.quant import sqnr_db
    from qcompiler.runtimes.ort import make_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--calib", nargs="+", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    reference = make_session(args.reference, threads=1)
    names = [i.name for i in reference.get_inputs()]
    sessions = {str(m): make_session(m, threads=1) for m in args.models}
    rows = {}
    for path in args.calib:
        with np.load(path) as data:
            feeds = {k: data[k] for k in names}
        expected = reference.run(None, feeds)[0]
        rows[path.name] = {m: sqnr_db(expected, s.run(None, feeds)[0]) for m, s in sessions.items()}
    print("| calibration file | " + " | ".join(Path(m).name for m in sessions) + " |")
    print("|---|" + "---|" * len(sessions))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
