"""ORT's ConvInteger with int8 vs uint8 weights, beside float Conv and QLinearConv, on one Conv shape.

The integer per-timestep Conv (``lowering/timestep_integer.py``) stores W_q + 128 as uint8 with weight
zero point 128 because ORT's u8×u8 ConvInteger is much faster than its u8×s8 one; this measures it.
x (32, 64, 16, 16) uint8 codes, W (64, 64, 3, 3), pads 1; median of ``--runs`` calls, one thread.

Usage: python benchmarks/conv_integer_weights.py [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import write_table  # noqa: E402

BATCH, CHANNELS, OUT, SIZE = 32, 64, 64, 16


def session(node, x_type, initializers, out_type):
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", x_type, [BATCH, CHANNELS, SIZE, SIZE])
    graph = helper.make_graph([node], "conv", [x], [helper.make_tensor_value_info("y", out_type, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def forms(weights: np.ndarray) -> dict:
    scalar = lambda name, value, dtype: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    shifted = (weights.astype(np.int16) + 128).astype(np.uint8)
    return {
        "ConvInteger, int8 weights": session(helper.make_node("ConvInteger", ["x", "w"], ["y"], pads=[1] * 4),
                                             TensorProto.UINT8, [numpy_helper.from_array(weights, "w")],
                                             TensorProto.INT32),
        "ConvInteger, uint8 weights (zero point 128)": session(
            helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1] * 4), TensorProto.UINT8,
            [numpy_helper.from_array(shifted, "w"), scalar("xz", 0, np.uint8), scalar("wz", 128, np.uint8)],
            TensorProto.INT32),
        "float Conv": session(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4), TensorProto.FLOAT,
                              [numpy_helper.from_array(weights.astype(np.float32), "w")], TensorProto.FLOAT),
        "QLinearConv (quantized output)": session(
            helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1] * 4),
            TensorProto.UINT8, [scalar("xs", 0.1, np.float32), scalar("xz", 0, np.uint8),
                                numpy_helper.from_array(weights, "w"), scalar("ws", 0.1, np.float32),
                                scalar("wz", 0, np.int8), scalar("ys", 1.0, np.float32), scalar("yz", 0, np.uint8)],
            TensorProto.UINT8),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (BATCH, CHANNELS, SIZE, SIZE)).astype(np.uint8)
    sessions = forms(rng.integers(-127, 128, (OUT, CHANNELS, 3, 3)).astype(np.int8))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(args.runs + 3):  # interleaved; the first 3 rounds warm up
        for name, s in sessions.items():
            feed = {"x": codes.astype(np.float32) if name == "float Conv" else codes}
            started = time.perf_counter()
            s.run(None, feed)
            if round_index >= 3:
                times[name].append(time.perf_counter() - started)
    rows = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
    lines = ["# ConvInteger weight types on ORT's CPU", "",
             f"`python benchmarks/conv_integer_weights.py --runs {args.runs}`: x ({BATCH}, {CHANNELS}, {SIZE}, {SIZE}), "
             f"W ({OUT}, {CHANNELS}, 3, 3), pads 1, 1 thread, median ms, forms interleaved.", "",
             "| form | ms |", "|---|---:|"] + [f"| {name} | {ms:.2f} |" for name, ms in rows.items()]
    write_table(args.out, "conv_integer_weights", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
