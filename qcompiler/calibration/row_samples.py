"""Random rows of activations drawn inside ORT: one forward pass per batch returns only the rows.

Searches (OS+, SmoothQuant's α) score candidate scales on up to ``rows`` rows (one value per
channel) of each scaled activation X. Capturing whole activations for that costs a forward pass
per chunk of tensors and batch (a PixArt-α block's tensors alone are ~2 GB per batch); instead
the capture graph appends, for a tensor of rank r with channel axis c,

    Transpose(c → last) → Reshape(−1, C) → Gather(rows, axis 0)

with the row indices a graph input, so one session serves every batch and ORT frees each X as
soon as its rows are taken. The indices are the same seeded draw as the full capture's (a
sorted choice without replacement among the B·Π(other dims) rows), so the samples are equal bit
for bit. Graph inputs are drawn from the feeds. A tensor whose shape inference leaves its row count
open (PixArt-α: 57 of 175 groups are attention outputs with a run-time token axis) gets its shape
from a probe: one forward pass per distinct feed-shape signature (one, usually) whose only outputs
are ``Shape(T)``; then it is gathered in ORT like the rest. Returning such tensors whole instead
held a chunk of full activations (~0.8 GB on PixArt-α) beside the forward pass. A tensor whose probed
channel count differs between signatures, or whose rank is below 2, still comes back whole and is
drawn in numpy: the same rows either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from qcompiler.calibration.capture import OutputRunner, as_skeleton, run_batch
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.errors import QCompileError
from qcompiler.runtimes.ort import make_session
from qcompiler.skeleton import Skeleton, insert_after_producers

log = logging.getLogger(__name__)


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


def _sampling_model(skel: Skeleton, runner: OutputRunner, gathered: Mapping[str, tuple[int, int, int]],
                    whole: Sequence[str]) -> Skeleton:
    """The skeleton with outputs: the Gather of each ``gathered`` tensor's rows, then each ``whole``
    tensor as it is (as float32)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    nodes, inits = [], []
    del proto.graph.output[:]
    for index, name in enumerate([*gathered, *whole]):
        prefix = f"qcompile_rows/{index}"
        source = name
        if runner.element_type(name) != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [source], [f"{prefix}/float"], to=onnx.TensorProto.FLOAT))
            source = f"{prefix}/float"
        if name not in gathered:
            if source == name:
                nodes.append(helper.make_node("Identity", [source], [f"{prefix}/rows"]))
            else:
                nodes[-1].output[0] = f"{prefix}/rows"
            proto.graph.output.append(helper.make_tensor_value_info(f"{prefix}/rows", onnx.TensorProto.FLOAT, None))
            continue
        rank, axis, channels = gathered[name]
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
    insert_after_producers(proto.graph, nodes)  # each capture node frees its tensor early
    proto.graph.initializer.extend(inits)
    return Skeleton(proto, skel.arrays)


def _draw_from(value: np.ndarray, axis: int, per_batch: int, seed: int, position: int, batch: int) -> np.ndarray:
    """The seeded draw of rows (channels last) from a whole tensor, as the in-graph Gather takes them."""
    value = np.moveaxis(np.asarray(value, np.float32), axis, -1)
    flat = value.reshape(-1, value.shape[-1])
    return flat[draw_rows(flat.shape[0], per_batch, seed, position, batch)]


def _static_rows(runner: OutputRunner, name: str, axis: int, batches: Sequence[CalibrationBatch]
                 ) -> tuple[tuple[int, int, int], list[int]] | None:
    """((rank, axis, channels), rows per batch) when shape inference fixes both, else None."""
    rank = runner.rank(name)
    if not rank or rank < 2:
        return None
    counts = [rows_per_batch(runner, name, axis, batch.batch_size) for batch in batches]
    channel = runner.dims(name)[axis % rank]
    if any(count is None for count in counts) or not channel.HasField("dim_value") or channel.dim_value <= 0:
        return None
    return (rank, axis, channel.dim_value), counts


def _feed_signature(batch: CalibrationBatch) -> tuple:
    return tuple(sorted((name, np.shape(value)) for name, value in batch.feeds.items()))


def probe_shapes(skel: Skeleton, names: Sequence[str], batches: Sequence[CalibrationBatch],
                 threads: int | None = None) -> dict[tuple, dict[str, tuple[int, ...]]]:
    """{feed-shape signature: {tensor: run-time shape}}: one forward pass per distinct signature,
    with ``Shape(T)`` as the only outputs (a few integers each, so no activation is returned)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    del proto.graph.output[:]
    nodes = []
    for index, name in enumerate(names):
        nodes.append(helper.make_node("Shape", [name], [f"qcompile_shape/{index}"]))
        proto.graph.output.append(helper.make_tensor_value_info(f"qcompile_shape/{index}", onnx.TensorProto.INT64,
                                                                None))
    insert_after_producers(proto.graph, nodes)
    session, shapes = None, {}
    outputs = [f"qcompile_shape/{index}" for index in range(len(names))]
    for batch in batches:
        signature = _feed_signature(batch)
        if signature in shapes:
            continue
        session = session or make_session(Skeleton(proto, skel.arrays), threads=threads, lean=True)
        values = run_batch(session, outputs, batch)
        shapes[signature] = {name: tuple(int(d) for d in value) for name, value in zip(names, values)}
    return shapes


def _probed_rows(shapes: dict[tuple, dict[str, tuple[int, ...]]], name: str, axis: int,
                 batches: Sequence[CalibrationBatch]) -> tuple[tuple[int, int, int], list[int]] | None:
    """``_static_rows``'s answer from probed shapes; None if the rank or channel count varies."""
    per_batch = [shapes[_feed_signature(batch)][name] for batch in batches]
    ranks = {len(shape) for shape in per_batch}
    if len(ranks) != 1 or min(ranks) < 2:
        return None
    rank = ranks.pop()
    channels = {shape[axis % rank] for shape in per_batch}
    if len(channels) != 1 or min(channels) <= 0:
        return None
    channel = channels.pop()
    return (rank, axis, channel), [math.prod(shape) // channel for shape in per_batch]


def sample_rows(model, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int], per_batch: int,
                seed: int, order: Sequence[str], threads: int | None = None,
                keep: Callable[[np.ndarray], np.ndarray] = lambda rows: rows, first: int = 0
                ) -> dict[str, dict[int, np.ndarray]]:
    """{tensor: {batch index: rows (n, C)}}: one forward pass per batch serves every tensor.

    ``tensors`` maps a name to its channel axis; ``order`` is the caller's tensor order, whose
    position seeds each tensor's draw. Rows of tensors with a static row count are gathered
    inside ORT; graph inputs come from the feeds, and tensors whose row count shape inference
    left open (e.g. a token axis computed at run time) come back whole from the same forward
    pass and are drawn here: the same rows either way. ``keep`` stores each part (e.g. spilled
    to a scratch file, so the samples of a large model do not stay resident). ``first``: the index
    of ``batches[0]`` in the whole data set (a calibration shard's offset), which keys the draws
    and the result."""
    skel = as_skeleton(model)
    runner = OutputRunner(skel, threads)
    runner.check(list(tensors))
    position = {name: index for index, name in enumerate(order)}
    gathered, counts, whole = {}, {}, []
    for name, axis in tensors.items():
        if name in runner.graph_inputs:
            continue
        static = _static_rows(runner, name, axis, batches)
        if static is None:
            whole.append(name)
        else:
            gathered[name], counts[name] = static
    if whole:
        shapes = probe_shapes(skel, whole, batches, threads)
        log.info("%d of %d sampled tensors have no static row count: shapes probed in %d forward pass(es)",
                 len(whole), len(tensors), len(shapes))
        for name in list(whole):
            probed = _probed_rows(shapes, name, tensors[name], batches)
            if probed is not None:
                whole.remove(name)
                gathered[name], counts[name] = probed
        if whole:
            log.info("%d sampled tensors returned whole and drawn in numpy", len(whole))
    samples: dict[str, dict[int, np.ndarray]] = {name: {} for name in tensors}
    computed = [*gathered, *whole]
    session = (make_session(_sampling_model(skel, runner, gathered, whole), threads=threads, lean=True)
               if computed else None)
    outputs = [f"qcompile_rows/{i}/rows" for i in range(len(computed))]
    for local, batch in enumerate(batches):
        b = first + local
        for name in tensors:
            if name in runner.graph_inputs:
                if name not in batch.feeds:
                    raise QCompileError(f"{batch.source}: calibration batch lacks model input {name}")
                samples[name][b] = keep(_draw_from(batch.feeds[name], tensors[name], per_batch, seed,
                                                   position[name], b))
        if session is None:
            continue
        feeds = dict(batch.feeds)
        for i, name in enumerate(gathered):
            feeds[f"qcompile_rows/{i}/indices"] = draw_rows(counts[name][local], per_batch, seed, position[name], b)
        values = run_batch(session, outputs, CalibrationBatch(feeds, batch.metadata, batch.source))
        for name, value in zip(computed, values):
            samples[name][b] = keep(np.asarray(value, np.float32) if name in gathered
                                    else _draw_from(value, tensors[name], per_batch, seed, position[name], b))
        del values
    return samples


class RowSamples(Mapping):
    """{tensor: rows (n, C)} whose per-batch parts may live in scratch files: each group's rows are
    joined when its search reads them and dropped after (PixArt-α's 175 groups: ~1.2 GB by their shapes)."""

    def __init__(self, parts: dict[str, dict[int, np.ndarray]], rows: int):
        self._parts, self._rows = parts, rows

    def __getitem__(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        return np.concatenate([parts[b] for b in sorted(parts)])[:self._rows]

    def __iter__(self):
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def sampled_rows(ctx, batches: Sequence[CalibrationBatch], axes: Mapping[str, int], rows: int,
                 seed: int) -> RowSamples:
    """Up to ``rows`` rows (n, C) of each tensor (name -> channel axis, in the caller's order, which
    seeds the draws) from ``batches``: one forward pass per batch (on ``ctx.cluster``'s workers when
    there is one, the same draw), parts spilled to scratch files, weight pages released after."""
    per_batch = -(-rows // max(len(batches), 1))
    names = list(axes)
    if ctx.cluster is not None:
        parts = ctx.cluster.sample_rows(ctx.skeleton(), batches, dict(axes), per_batch, seed, names)
    else:
        parts = sample_rows(ctx.skeleton(), batches, dict(axes), per_batch, seed, names, ctx.threads,
                            keep=ctx.spill)
    ctx.release_weight_pages()
    return RowSamples(parts, rows)
