"""Random rows of activations drawn inside ORT: one forward pass per batch returns only the rows.

Searches (OS+, SmoothQuant's α) score candidate scales on up to ``rows`` rows (one value per
channel) of each scaled activation X. Capturing whole activations for that costs a forward pass
per chunk of tensors and batch (a PixArt-α block's tensors alone are ~2 GB per batch); instead
the capture graph appends, for a tensor of rank r with channel axis c,

    Transpose(c → last) → Reshape(−1, C) → Gather(rows, axis 0)

with the row indices a graph input, so one session serves every batch and ORT frees each X as
soon as its rows are taken. The indices are the same seeded draw as the full capture's (a
sorted choice without replacement among the B·Π(other dims) rows), so the samples are equal bit
for bit. A tensor whose row count is not known from shape inference is left to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from qcompiler.calibration.capture import OutputRunner, as_skeleton, run_batch
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.runtimes.ort import make_session
from qcompiler.skeleton import Skeleton


def draw_rows(count: int, per_batch: int, seed: int, position: int, batch: int) -> np.ndarray:
    """The sorted seeded draw of up to ``per_batch`` of ``count`` rows, keyed by (seed, the
    tensor's position in the caller's order, batch index): the same wherever rows are taken."""
    rng = np.random.default_rng([seed, position, batch])
    return np.sort(rng.choice(count, size=min(per_batch, count), replace=False))


def rows_per_batch(runner: OutputRunner, name: str, axis: int, batch_size: int) -> int | None:
    """Rows of ``name`` flattened channels-last for a batch of ``batch_size``; None if not static."""
    dims = runner.dims(name)
    if dims is None:
        return None
    axis = axis % len(dims)
    sizes = []
    for index, dim in enumerate(dims):
        if index == axis:
            continue
        if dim.HasField("dim_value") and dim.dim_value > 0:
            sizes.append(dim.dim_value)
        elif index == 0:
            sizes.append(batch_size)  # the symbolic batch axis
        else:
            return None
    return math.prod(sizes)


def _sampling_model(skel: Skeleton, runner: OutputRunner, tensors: Mapping[str, tuple[int, int, int]]) -> Skeleton:
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    nodes, inits = [], []
    del proto.graph.output[:]
    for index, (name, (rank, axis, channels)) in enumerate(tensors.items()):
        prefix = f"qcompile_rows/{index}"
        source = name
        if runner.element_type(name) != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [source], [f"{prefix}/float"], to=onnx.TensorProto.FLOAT))
            source = f"{prefix}/float"
        axis = axis % rank
        if axis != rank - 1:
            perm = [a for a in range(rank) if a != axis] + [axis]
            nodes.append(helper.make_node("Transpose", [source], [f"{prefix}/last"], perm=perm))
            source = f"{prefix}/last"
        inits.append(onnx.numpy_helper.from_array(np.array([-1, channels], np.int64), f"{prefix}/shape"))
        nodes.append(helper.make_node("Reshape", [source, f"{prefix}/shape"], [f"{prefix}/flat"]))
        proto.graph.input.append(helper.make_tensor_value_info(f"{prefix}/indices", onnx.TensorProto.INT64, [None]))
        nodes.append(helper.make_node("Gather", [f"{prefix}/flat", f"{prefix}/indices"], [f"{prefix}/rows"], axis=0))
        proto.graph.output.append(helper.make_tensor_value_info(f"{prefix}/rows", onnx.TensorProto.FLOAT, None))
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    return Skeleton(proto, skel.arrays)


def sample_rows(model, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int], per_batch: int,
                seed: int, order: Sequence[str], threads: int | None = None, first: int = 0
                ) -> tuple[dict[str, dict[int, np.ndarray]], list[str]]:
    """({tensor: {batch index: rows (n, C)}}, tensors left for a full capture).

    ``tensors`` maps a name to its channel axis; ``order`` is the caller's tensor order, whose
    position seeds each tensor's draw, as the full capture does. ``first``: the index of
    ``batches[0]`` in the whole data set (a shard's offset), which keys the draws and the result."""
    skel = as_skeleton(model)
    runner = OutputRunner(skel, threads)
    position = {name: index for index, name in enumerate(order)}
    sizes = {b: {} for b in range(first, first + len(batches))}
    inside: dict[str, tuple[int, int, int]] = {}
    rest = []
    for name, axis in tensors.items():
        rank = runner.rank(name)
        counts = [rows_per_batch(runner, name, axis, batch.batch_size) if rank and rank >= 2 else None
                  for batch in batches]
        dims = runner.dims(name) or []
        channel = dims[axis % len(dims)] if dims else None
        if name in runner.graph_inputs or any(count is None for count in counts) or channel is None \
                or not channel.HasField("dim_value") or channel.dim_value <= 0:
            rest.append(name)
            continue
        inside[name] = (rank, axis, channel.dim_value)
        for b, count in enumerate(counts, start=first):
            sizes[b][name] = count
    samples: dict[str, dict[int, np.ndarray]] = {name: {} for name in inside}
    if not inside:
        return samples, rest
    session = make_session(_sampling_model(skel, runner, inside), threads=threads, lean=True)
    outputs = [f"qcompile_rows/{i}/rows" for i in range(len(inside))]
    for b, batch in enumerate(batches, start=first):
        feeds = dict(batch.feeds)
        for i, name in enumerate(inside):
            feeds[f"qcompile_rows/{i}/indices"] = draw_rows(sizes[b][name], per_batch, seed, position[name], b)
        values = run_batch(session, outputs, CalibrationBatch(feeds, batch.metadata, batch.source))
        for name, value in zip(inside, values):
            samples[name][b] = np.asarray(value, np.float32)
    return samples, rest


def draw_samples(model, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int], per_batch: int, seed: int,
                 order: Sequence[str], threads: int | None = None, first: int = 0,
                 tensors_per_run: int = 256) -> dict[str, dict[int, np.ndarray]]:
    """``{tensor: {batch index: rows (n, C)}}``: :func:`sample_rows` inside ORT where shapes allow,
    the same draw from a full capture (``capture.stream_tensors``) for the rest. ``first`` as there."""
    from qcompiler.calibration.capture import stream_tensors
    from qcompiler.calibration.statistics import StatsConfig

    skel = as_skeleton(model)
    samples, rest = sample_rows(skel, batches, tensors, per_batch, seed, order, threads, first)
    position = {name: index for index, name in enumerate(order)}
    batch_index = {id(batch): index for index, batch in enumerate(batches, start=first)}
    samples.update({name: {} for name in rest})
    config = StatsConfig(tensors_per_run=tensors_per_run, progress=False, threads=threads)
    for batch, values in (stream_tensors(skel, batches, rest, config, desc="sampling rows") if rest else ()):
        b = batch_index[id(batch)]
        for name, value in values.items():
            value = np.moveaxis(np.asarray(value, np.float32), tensors[name], -1)
            flat = value.reshape(-1, value.shape[-1])
            samples[name][b] = flat[draw_rows(flat.shape[0], per_batch, seed, position[name], b)]
        del values
    return samples
