"""What a GEMM with per-token, per-group activation scales (Q-DiT's dynamic groups) costs on ORT's CPU.

One Linear Y = X·W, X (M, K) uint8 codes, W (K, N) int8, run alone on 1 thread, in four forms:
- ``float``: Cast + float MatMul (what a simulated lowering costs at least);
- ``int8``: one MatMulIntegerToFloat with per-column scales (per-tensor activations: the static recipes);
- ``blockdiag``: qcompile's integer lowering of dynamic groups (``qcompiler/lowering/dynamic_groups.py``):
  one MatMulIntegerToFloat over a block-diagonal (K, G·N) weight, then the (M, 1, G)·(M, G, N) scale MatMul;
- ``nbits4``: Cast + MatMulNBits (int4 weights in blocks of 32, ``accuracy_level=4``: ORT quantizes the
  activations to int8 per row and block inside the kernel), the static recipes' W4 form, for scale;
- ``batched``: the alternative, a batched MatMulInteger over the G groups ((G, M, K/G)·(G, K/G, N)), Cast,
  Mul by the (G, M, 1) scales and ReduceSum over G.
Both grouped forms must write G·N int32 partial sums per row instead of N, because the scales differ per
token *and* group; the table shows what that costs against G.

Usage: python benchmarks/group_gemm_forms.py [--runs 30] [--name group_gemm_forms] [--out benchmarks/results]
Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMS = ("float", "int8", "nbits4", "blockdiag", "batched")
#: (M, K, N, group sizes): the zoo DiT's Linears (hidden 96, MLP 384, 32 images × 64 tokens; group sizes 3–32)
#: and one DiT-XL Linear (hidden 1152; the paper's group sizes 32, 96, 288).
SHAPES = [(2048, 96, 96, (3, 8, 32)), (2048, 96, 384, (3, 8, 32)), (2048, 384, 96, (12, 32, 128)),
          (4096, 1152, 1152, (32, 96, 288))]


def build(form: str, m: int, k: int, n: int, groups: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng, g = np.random.default_rng(0), k // groups
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(value, name))

    if form == "blockdiag":
        weight = np.zeros((k, groups * n), np.int8)
        for i in range(groups):
            weight[i * g:(i + 1) * g, i * n:(i + 1) * n] = rng.integers(-7, 8, (g, n))
        const("w", weight), const("a", np.array(1.0, np.float32)), const("b", rng.random(groups * n).astype(np.float32))
        const("shape", np.array([m, groups, n], np.int64)), const("rs", rng.random((m, 1, groups)).astype(np.float32))
        nodes += [helper.make_node("MatMulIntegerToFloat", ["x", "w", "a", "b"], ["s"], domain="com.microsoft"),
                  helper.make_node("Reshape", ["s", "shape"], ["s3"]), helper.make_node("MatMul", ["rs", "s3"], ["y"])]
    elif form == "batched":
        const("w", rng.integers(-7, 8, (groups, g, n)).astype(np.int8)), const("shape", np.array([m, groups, g], np.int64))
        const("rs", rng.random((groups, m, 1)).astype(np.float32)), const("axis", np.array([0], np.int64))
        nodes += [helper.make_node("Reshape", ["x", "shape"], ["x3"]),
                  helper.make_node("Transpose", ["x3"], ["xt"], perm=[1, 0, 2]),
                  helper.make_node("MatMulInteger", ["xt", "w"], ["i"]),
                  helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["f", "rs"], ["fs"]),
                  helper.make_node("ReduceSum", ["fs", "axis"], ["y"], keepdims=0)]
    elif form == "float":
        const("w", rng.random((k, n)).astype(np.float32))
        nodes += [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "w"], ["y"])]
    elif form == "nbits4":
        blocks = k // 32
        const("w", rng.integers(0, 256, (n, blocks, 16)).astype(np.uint8))
        const("scale", rng.random(n * blocks).astype(np.float32))
        nodes += [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                  helper.make_node("MatMulNBits", ["xf", "w", "scale"], ["y"], domain="com.microsoft", K=k, N=n,
                                   bits=4, block_size=32, accuracy_level=4)]
    else:
        const("w", rng.integers(-7, 8, (k, n)).astype(np.int8)), const("a", np.array(1.0, np.float32))
        const("b", rng.random(n).astype(np.float32))
        nodes.append(helper.make_node("MatMulIntegerToFloat", ["x", "w", "a", "b"], ["y"], domain="com.microsoft"))
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def median_ms(form: str, m: int, k: int, n: int, groups: int, runs: int) -> float:
    """Median ms of one call, 1 thread (``bench_triton.direct_latency_ms``: 5 warm-up calls first)."""
    import tempfile

    from bench_triton import direct_latency_ms

    feed = {"x": np.random.default_rng(1).integers(0, 256, (m, k)).astype(np.uint8)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{form}.onnx"
        path.write_bytes(build(form, m, k, n, groups))
        return direct_latency_ms(path, feed, threads=1, runs=runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--name", default="group_gemm_forms")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    rows = []
    for m, k, n, group_sizes in SHAPES:
        for group in group_sizes:
            runs = max(5, args.runs // 3) if k > 512 else args.runs
            row = {"M": m, "K": k, "N": n, "group": group, "G": k // group,
                   **{f"{form}_ms": median_ms(form, m, k, n, k // group, runs) for form in FORMS}}
            rows.append(row)
            print(" ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items()), flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": args.runs,
            "machine": f"{platform.processor() or platform.machine()}, 1 thread"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Per-token-group GEMM forms on ORT CPU ({meta['date']}, {meta['machine']})", "",
             "`python benchmarks/group_gemm_forms.py`: median ms of one Linear (module docstring for the forms); "
             "× = against `int8` (per-tensor activations, one integer GEMM).", "",
             "| M | K | N | group | G | float ms | int8 ms | nbits4 ms | blockdiag ms (× int8) | batched ms (× int8) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['group']} | {r['G']} | {r['float_ms']:.2f} | "
                     f"{r['int8_ms']:.2f} | {r['nbits4_ms']:.2f} | {r['blockdiag_ms']:.2f} (×{r['blockdiag_ms'] / r['int8_ms']:.1f}) | "
                     f"{r['batched_ms']:.2f} (×{r['batched_ms'] / r['int8_ms']:.1f}) |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
