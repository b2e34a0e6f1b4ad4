"""Graph rewriting for ``bench_outliers``'s drop arms, and the mask-count copy that measures them.

Each arm rewrites every GEMM input X in front of its GEMMs (other consumers keep X):
``outlier`` Where(|X| > τ, 0, X), ``clip`` Clip(X, −τ, τ), ``random``
Where(RandomUniformLike(X, seed) < p, 0, X). The measuring copy also returns ReduceSum(mask)
and Size(X) per tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ARMS = ("outlier", "random", "clip", "outlier-internal")


def _threshold_nodes(graph, x: str, prefix: str, tau_value: float, arm: str, zero: str) -> list:
    """``outlier``: Where(|X| > τ, 0, X); ``clip``: Clip(X, −τ, τ); both with mask = |X| > τ."""
    tau = numpy_helper.from_array(np.array(tau_value, np.float32), f"{prefix}/tau")
    graph.initializer.append(tau)
    nodes = [helper.make_node("Abs", [x], [f"{prefix}/abs"], name=f"{prefix}/Abs"),
             helper.make_node("Greater", [f"{prefix}/abs", tau.name], [f"{prefix}/mask"],
                              name=f"{prefix}/Greater")]
    if arm == "outlier":
        nodes.append(helper.make_node("Where", [f"{prefix}/mask", zero, x], [f"{prefix}/x"],
                                      name=f"{prefix}/Where"))
    else:
        neg = numpy_helper.from_array(np.array(-tau_value, np.float32), f"{prefix}/neg_tau")
        graph.initializer.append(neg)
        nodes.append(helper.make_node("Clip", [x, neg.name, tau.name], [f"{prefix}/x"],
                                      name=f"{prefix}/Clip"))
    return nodes


def _random_nodes(graph, x: str, prefix: str, p: float, seed: int, zero: str) -> list:
    """``random``: Where(RandomUniformLike(X, seed) < p, 0, X)."""
    prob = numpy_helper.from_array(np.array(p, np.float32), f"{prefix}/p")
    graph.initializer.append(prob)
    return [helper.make_node("RandomUniformLike", [x], [f"{prefix}/u"], name=f"{prefix}/Random",
                             seed=float(seed), dtype=TensorProto.FLOAT),
            helper.make_node("Less", [f"{prefix}/u", prob.name], [f"{prefix}/mask"], name=f"{prefix}/Less"),
            helper.make_node("Where", [f"{prefix}/mask", zero, x], [f"{prefix}/x"],
                             name=f"{prefix}/Where")]


def _count_nodes(x: str, prefix: str, i: int) -> tuple[list, list]:
    """Nodes and graph outputs ``drop_count/i`` = Σ mask (int64) and ``drop_size/i`` = Size(X)."""
    nodes = [helper.make_node("Cast", [f"{prefix}/mask"], [f"{prefix}/mask64"], to=TensorProto.INT64,
                              name=f"{prefix}/Cast"),
             helper.make_node("ReduceSum", [f"{prefix}/mask64"], [f"drop_count/{i}"], keepdims=0,
                              name=f"{prefix}/ReduceSum"),
             helper.make_node("Size", [x], [f"drop_size/{i}"], name=f"{prefix}/Size")]
    outputs = [helper.make_tensor_value_info(f"drop_count/{i}", TensorProto.INT64, []),
               helper.make_tensor_value_info(f"drop_size/{i}", TensorProto.INT64, [])]
    return nodes, outputs


def _insert_in_order(graph, new_nodes: list) -> None:
    """Topological order: a graph input's rewrite goes first; any other right after its producer."""
    producer_index = {name: k for k, n in enumerate(graph.node) for name in n.output}
    inserts: dict[int, list] = {}
    for node in new_nodes:
        source = node.input[0]
        while source.startswith("bench_drop/"):  # chained rewrite nodes follow their first one
            source = next(n.input[0] for n in new_nodes if source in n.output)
        inserts.setdefault(producer_index.get(source, -1), []).append(node)
    ordered = list(inserts.get(-1, []))
    for k, node in enumerate(graph.node):
        ordered.append(node)
        ordered += inserts.get(k, [])
    del graph.node[:]
    graph.node.extend(ordered)


def drop_model(model: onnx.ModelProto, gemm_inputs, taus: dict[str, float] | None, arm: str, p: float,
               seed: int, measure: bool) -> onnx.ModelProto:
    """A copy of ``model`` in which every GEMM reading X reads the arm's X' (see the module docstring).

    With ``measure`` the graph also returns, per tensor i, ``drop_count/i`` = Σ mask (int64) and
    ``drop_size/i`` = Size(X).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes_by_name = {n.name: n for n in graph.node}
    zero = numpy_helper.from_array(np.zeros((), np.float32), "bench_drop/zero")
    graph.initializer.append(zero)
    new_nodes, outputs = [], []
    for i, act in enumerate(gemm_inputs):
        x, prefix = act.tensor, f"bench_drop/{i}"
        if arm == "outlier" or arm == "clip":
            new_nodes += _threshold_nodes(graph, x, prefix, taus[x], arm, zero.name)
        elif arm == "random":
            new_nodes += _random_nodes(graph, x, prefix, p, seed + i, zero.name)
        else:
            raise ValueError(arm)
        if measure:
            nodes, values = _count_nodes(x, prefix, i)
            new_nodes += nodes
            outputs += values
        for consumer in act.consumers:
            node = nodes_by_name[consumer]
            if node.input[0] != x:
                raise RuntimeError(f"{consumer}: input 0 is {node.input[0]}, expected {x}")
            node.input[0] = f"{prefix}/x"
    _insert_in_order(graph, new_nodes)
    graph.output.extend(outputs)
    return out


def measure_drops(path: Path, batches, gemm_inputs, threads: int) -> dict:
    """Dropped / total elements per tensor and overall on ``batches`` (the measuring copy of an arm)."""
    from qcompiler.runtimes.ort import make_session

    session = make_session(path, threads=threads)
    names = [f"drop_count/{i}" for i in range(len(gemm_inputs))] + [f"drop_size/{i}" for i in range(len(gemm_inputs))]
    wanted = [i.name for i in session.get_inputs()]
    dropped = np.zeros(len(gemm_inputs), np.int64)
    sizes = np.zeros(len(gemm_inputs), np.int64)
    per_file = []
    for batch in batches:
        values = session.run(names, {k: batch.feeds[k] for k in wanted})
        counts, size = np.array(values[:len(gemm_inputs)]), np.array(values[len(gemm_inputs):])
        dropped += counts
        sizes += size
        per_file.append({"file": Path(batch.source).name, "timestep": int(batch.metadata["__timestep__"][0]),
                         "fraction": float(counts.sum() / size.sum())})
    fractions = dropped / np.maximum(sizes, 1)
    return {"dropped": int(dropped.sum()), "elements": int(sizes.sum()), "fraction": float(dropped.sum() / sizes.sum()),
            "per_tensor_fraction": {"min": float(fractions.min()), "median": float(np.median(fractions)),
                                    "max": float(fractions.max())},
            "per_file": per_file, "per_tensor": fractions.tolist()}


def build_arm(proto: onnx.ModelProto, arm: str, p: float, taus: dict[str, float], gemm_inputs,
              graph_inputs: set[str], work: Path, measure_batches, threads: int):
    """Save the arm's model and its measuring copy to ``work``; measure the dropped fraction.

    ``outlier-internal`` is ``outlier`` on the GEMM inputs that are not graph inputs. Returns
    (name, model path, the rewritten GEMM inputs, measured fractions).
    """
    name = f"{arm}_p{p:g}"
    path, measure_path = work / f"{name}.onnx", work / f"{name}.measure.onnx"
    subset = [a for a in gemm_inputs if a.tensor not in graph_inputs] if arm == "outlier-internal" \
        else gemm_inputs
    kind = "outlier" if arm == "outlier-internal" else arm
    onnx.save(drop_model(proto, subset, taus, kind, p, 1000, measure=False), str(path))
    onnx.save(drop_model(proto, subset, taus, kind, p, 1000, measure=True), str(measure_path))
    measured = measure_drops(measure_path, measure_batches, subset, threads)
    measured["tensors"] = len(subset)
    return name, path, subset, measured
