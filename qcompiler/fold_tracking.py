"""Which values an equivalence fold changed, so the statistics cache stays valid across it.

``folding.fold`` snapshots every node's inputs (tensor and constant-value identities) before it
rewrites, and hands the difference here: the tensors downstream of a rewritten node, restricted for
an equivalence fold to the paths into X' and into the GEMMs that took s and z (their outputs are
equivalent, so nothing after them changed), and for an AdaLN modulation to what its rescale walked
through. ``CompileContext.fold_statistics`` then derives X''s ranges and drops the other changed
tensors' (docs/architecture.md, the statistics cache).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.context import CompileContext
from qcompiler.modulation import Modulation
from qcompiler.patterns import match_conv, match_linear

#: Ops that read only the shape of their input: a folded X does not change what they compute.
SHAPE_ONLY = ("Shape", "Size")


def node_inputs(graph: gs.Graph) -> dict[int, tuple]:
    """Per node (by id): what it reads (tensor and constant value identities) and its attributes, to
    see afterwards which nodes a fold rewrote (``_changed_tensors``)."""
    return {id(node): _node_inputs_of(node) for node in graph.nodes}


def _changed_tensors(graph: gs.Graph, before: dict[int, tuple], equivalent: list[gs.Tensor],
                     ends: list[gs.Tensor] | None = None) -> set[str]:
    """Names of the tensors whose values a fold changed: everything downstream of a rewritten or new
    node, up to the tensors the fold leaves equivalent (its GEMMs' outputs) and shape-only readers.

    ``ends`` (an equivalence fold: X' and its GEMMs' outputs): only tensors on a path from a rewritten
    node to one of them. A fold changes values only on the way from the producer to X (the readers
    a producer shares are checked by ``find_absorber``; a modulation's other chunks, e.g. its gates,
    keep factor 1), so a branch off that path (PixArt's gate chunk, feeding the rest of the network)
    keeps its values."""
    rewritten = [node for node in graph.nodes if before.get(id(node)) != _node_inputs_of(node)]
    stop = {tensor.name for tensor in equivalent}
    changed: set[str] = set()
    stack = [t for node in rewritten for t in node.outputs]
    while stack:
        tensor = stack.pop()
        if tensor.name in changed or tensor.name in stop:
            continue
        changed.add(tensor.name)
        stack.extend(t for reader in tensor.outputs if reader.op not in SHAPE_ONLY for t in reader.outputs)
    if ends is None:
        return changed
    on_path: set[str] = set()
    stack = list(ends)
    while stack:  # the ancestors of the ends (only those that changed matter)
        tensor = stack.pop()
        if tensor.name in on_path:
            continue
        on_path.add(tensor.name)
        if tensor.inputs:
            stack.extend(t for t in tensor.inputs[0].inputs if t.name in changed or t.name in stop)
    return changed & on_path


def _node_inputs_of(node: gs.Node) -> tuple:
    # One flat tuple of identities (runs for every node, twice per fold): inputs, constant values,
    # a separator, outputs, attribute values.
    inputs = node.inputs
    return (*map(id, inputs), *[id(t._values) for t in inputs if isinstance(t, gs.Constant)], None,
            *map(id, node.outputs), *node.attrs.keys(), *map(id, node.attrs.values()))


def keep_statistics(ctx: CompileContext, source: gs.Tensor, target: gs.Tensor, consumers: list[gs.Node],
                     axis: int, scale: np.ndarray, shift: np.ndarray | None, before: dict[int, tuple],
                     modulation: Modulation | None = None) -> None:
    """After a fold: ``target`` (X itself where a producer absorbed the fold, else the explicit Mul's
    output) holds (X − z)/s; the outputs of ``consumers`` that are GEMMs (their weights took s and z)
    are equivalent; everything else downstream of a rewritten node changed."""
    units = [match_linear(node) or match_conv(node) for node in consumers]
    equivalent = [unit.output for unit in units if unit]
    # An equivalence fold (every reader a GEMM that took s and z): only the path to X' and into the
    # GEMMs changed. Otherwise (a lowering's Q readers) everything downstream did.
    exact = len(equivalent) == len(consumers)
    changed = _changed_tensors(ctx.graph, before, equivalent, [target, *equivalent] if exact else None)
    if exact and modulation is not None:
        # A modulation's table feeds its other chunks too (the gates, and through them the rest of
        # the network) with unchanged values: what changed is what its rescale walked through, X',
        # and the GEMMs' own outputs before their biases.
        inside = {node.outputs[0].name for node in consumers} - {t.name for t in equivalent}
        changed &= modulation.changed | inside | {target.name}
    rank = len(source.shape) if source.shape is not None else None
    ctx.fold_statistics(changed, source.name, target.name, axis, rank, scale, shift)
