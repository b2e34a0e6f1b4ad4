"""Range statistics reduced inside ORT: one forward pass per batch, outputs of a few numbers per tensor.

The compile passes read ranges only: per-channel and per-position min/max (and the per-tensor
min/max/absmax they imply), never histograms. So instead of returning each activation (an SD
UNet's are ~1 GB per 512-px sample) and reducing it in numpy, the capture graph appends, for a
tensor T of rank r with channel axis c,

    channel_min/max = ReduceMin/ReduceMax(T, axes = all but c)          shape (C,)
    channel_sum     = ReduceSum(T, axes = all but c)                    shape (C,) (for channel means)
    index_min/max   = ReduceMin/ReduceMax(T, axes = {0, c})             shape (positions…)

and asks ORT for those outputs only. ORT frees T after its last consumer, so memory is one
forward pass, and every tensor is reduced in the same pass. Min and max are exact (no
rounding), so the ranges equal the numpy reduction of ``TensorStats.update`` bit for bit;
histograms and mean |x| are not computed (``hist_counts`` is empty). A tensor whose
rank is unknown, below 2, or whose reductions come back non-finite (NaN/Inf in the activation)
is captured in full instead, which counts its non-finite values as ``update`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from qcompiler.calibration.capture import OutputRunner, as_skeleton, run_batch
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.errors import QCompileError
from qcompiler.runtimes.ort import make_session
from qcompiler.skeleton import Skeleton, insert_after_producers

log = logging.getLogger(__name__)

KINDS = ("channel_min", "channel_max", "channel_sum", "index_min", "index_max")


def _opset(proto: onnx.ModelProto) -> int:
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 17)


def _reduce(op: str, source: str, axes: list[int], output: str, opset: int, nodes: list, inits: list) -> None:
    if opset >= (13 if op == "ReduceSum" else 18):  # axes became an input: ReduceSum 13, Min/Max 18
        axes_name = f"{output}/axes"
        inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        nodes.append(helper.make_node(op, [source, axes_name], [output], keepdims=0))
    else:
        nodes.append(helper.make_node(op, [source], [output], axes=axes, keepdims=0))


def reduction_model(skel: Skeleton, runner: OutputRunner, tensors: Mapping[str, int]) -> tuple[Skeleton, dict]:
    """The skeleton plus reduction nodes; outputs ``{tensor: {kind: output name}}`` for ``tensors``.

    ``tensors`` maps a name to (rank, channel axis ≥ 1). Float activations are reduced as they are;
    other types are cast to float first (exact for the values calibration sees).
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    opset = _opset(proto)
    nodes, inits, outputs = [], [], {}
    for index, (name, (rank, axis)) in enumerate(tensors.items()):
        source = name
        if runner.element_type(name) != onnx.TensorProto.FLOAT:
            source = f"qcompile_stats/{index}/float"
            nodes.append(helper.make_node("Cast", [name], [source], to=onnx.TensorProto.FLOAT))
        other = [a for a in range(rank) if a != axis]
        names = {kind: f"qcompile_stats/{index}/{kind}" for kind in KINDS}
        _reduce("ReduceMin", source, other, names["channel_min"], opset, nodes, inits)
        _reduce("ReduceMax", source, other, names["channel_max"], opset, nodes, inits)
        _reduce("ReduceSum", source, other, names["channel_sum"], opset, nodes, inits)
        _reduce("ReduceMin", source, [0, axis], names["index_min"], opset, nodes, inits)
        _reduce("ReduceMax", source, [0, axis], names["index_max"], opset, nodes, inits)
        outputs[name] = names
    insert_after_producers(proto.graph, nodes)  # each capture node frees its tensor early
    proto.graph.initializer.extend(inits)
    del proto.graph.output[:]
    proto.graph.output.extend(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                              for names in outputs.values() for out in names.values())
    return Skeleton(proto, skel.arrays), outputs


def collect_ranges(model, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int | None], config,
                   rows=None):
    """``TensorStats`` (ranges only) of ``tensors`` (name -> channel axis) over ``batches``.

    Tensors that cannot be reduced in the graph (see the module docstring) go through the full
    capture engine; the result is in the order of ``tensors``. ``rows``: a
    ``row_samples.RowSampler`` whose rows are drawn in the same forward passes (its ``samples``).
    """
    from qcompiler.calibration.statistics import TensorStats, collect_statistics

    skel = as_skeleton(model)
    runner = OutputRunner(skel, config.threads)
    runner.check(list(tensors))
    reducible: dict[str, tuple[int, int]] = {}
    for name, axis in tensors.items():
        rank = runner.rank(name)
        if name in runner.graph_inputs or rank is None or rank < 2:
            continue
        channel = rank - 1 if axis is None else axis + rank if axis < 0 else axis
        if not 1 <= channel < rank:
            raise QCompileError(f"tensor '{name}': channel axis {axis} is out of range for rank {rank} "
                                "(axis 0 is the batch axis); use 1..rank-1 or None for the last axis")
        reducible[name] = (rank, channel)
    stats: dict[str, TensorStats] = {}
    fallback = [name for name in tensors if name not in reducible]
    if reducible or rows is not None:
        reduced, outputs = reduction_model(skel, runner, reducible)
        if rows is not None:
            rows.attach(skel, runner, batches, reduced.proto)
        wanted = [out for names in outputs.values() for out in names.values()]
        session = (make_session(reduced, threads=config.threads, lean=True)
                   if wanted or (rows is not None and rows.outputs) else None)
        for local, batch in enumerate(tqdm(batches, desc="calibration ranges", unit="batch", leave=False,
                                           disable=None if config.progress else True)):
            extra, fed = [], batch
            if rows is not None:
                extra = rows.wanted(local)
                fed = CalibrationBatch({**batch.feeds, **rows.feeds(local)}, batch.metadata, batch.source)
            results = run_batch(session, wanted + extra, fed) if session is not None else []
            if rows is not None:
                rows.consume(local, batch, results[len(wanted):])
            values = dict(zip(wanted, results))
            del results
            for name, names in outputs.items():
                parts = {kind: values[out] for kind, out in names.items()}
                if not all(np.isfinite(part).all() for part in parts.values()):
                    fallback.append(name)  # NaN/Inf in the activation: the full path counts them
                    continue
                if name not in stats:
                    stats[name] = TensorStats.empty(name, reducible[name][1], parts["channel_min"].size,
                                                    parts["index_min"].size if config.per_index else None)
                stats[name].update_ranges(parts, batch.batch_size, source=batch.source)
        del session
    fallback = list(dict.fromkeys(fallback))
    for name in fallback:
        stats.pop(name, None)
    if fallback:
        log.info("calibration ranges: %d tensor(s) captured in full (rank unknown/<2 or non-finite)", len(fallback))
        # ``config`` has ranges_only off (collect_statistics cleared it), so this is the full path.
        stats.update(collect_statistics(skel, batches, {name: tensors[name] for name in fallback}, config))
    return {name: stats[name] for name in tensors}
