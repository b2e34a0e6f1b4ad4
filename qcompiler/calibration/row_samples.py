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
drawn in numpy: the same rows either way. A ``RowSampler`` can also ride on the range statistics'
forward passes (``reductions.collect_ranges(rows=...)``): OS+ and SmoothQuant then read their
calibration data once, not twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from qcompiler.calibration.capture import OutputRunner, as_skeleton, default_chunk_bytes, run_batch
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


def _row_nodes(runner: OutputRunner, gathered: Mapping[str, tuple[int, int, int]], whole: Sequence[str]
               ) -> tuple[list, list, list, list[str]]:
    """(nodes, initializers, index inputs, output names) that take each ``gathered`` tensor's rows
    (a Gather of its channels-last flattening) and return each ``whole`` tensor as it is (as float32)."""
    nodes, inits, inputs, outputs = [], [], [], []
    for index, name in enumerate([*gathered, *whole]):
        prefix = f"qcompile_rows/{index}"
        source = name
        if runner.element_type(name) != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [source], [f"{prefix}/float"], to=onnx.TensorProto.FLOAT))
            source = f"{prefix}/float"
        outputs.append(f"{prefix}/rows")
        if name not in gathered:
            if source == name:
                nodes.append(helper.make_node("Identity", [source], [f"{prefix}/rows"]))
            else:
                nodes[-1].output[0] = f"{prefix}/rows"
            continue
        rank, axis, channels = gathered[name]
        axis = axis % rank
        if axis != rank - 1:
            perm = [a for a in range(rank) if a != axis] + [axis]
            nodes.append(helper.make_node("Transpose", [source], [f"{prefix}/last"], perm=perm))
            source = f"{prefix}/last"
        inits.append(onnx.numpy_helper.from_array(np.array([-1, channels], np.int64), f"{prefix}/shape"))
        nodes.append(helper.make_node("Reshape", [source, f"{prefix}/shape"], [f"{prefix}/flat"]))
        inputs.append(helper.make_tensor_value_info(f"{prefix}/indices", onnx.TensorProto.INT64, [None]))
        nodes.append(helper.make_node("Gather", [f"{prefix}/flat", f"{prefix}/indices"], [f"{prefix}/rows"], axis=0))
    return nodes, inits, inputs, outputs


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


class RowSampler:
    """Row sampling that rides on a capture pass: it adds its Gather nodes to the pass's graph
    (``attach``), gives each batch's index feeds (``feeds``) and stores each batch's rows
    (``consume``). ``sample_rows`` runs it alone; ``reductions.collect_ranges`` runs it beside its
    reductions, so a pass that needs ranges and rows (OS+, SmoothQuant) does one forward pass per
    batch for both (the same draws, the same values bit for bit).

    ``sampled``: how many of the pass's batches (the first ones) are sampled; later batches feed
    empty indices (ORT runs every node whatever outputs are asked for) and return nothing.
    ``first``: the index of the pass's first batch in the whole data set (a calibration shard's
    offset), which keys the draws and the result.

    Tensors whose row count shape inference leaves open need a probe pass for their shapes, unless
    ``expect`` gave their sizes per sample (from statistics of earlier rows) and the whole tensors
    of one batch fit ``whole_bytes`` (default: the capture's chunk budget, ``capture.default_chunk_bytes``):
    they then come back whole from the pass itself and are drawn in numpy, the same rows (DGQ's
    held-out rows on SD-1.5: 48 open tensors, 0.28 GB for one latent, and one forward pass fewer)."""

    def __init__(self, tensors: Mapping[str, int], per_batch: int, seed: int, order: Sequence[str],
                 sampled: int, threads: int | None = None,
                 keep: Callable[[np.ndarray], np.ndarray] = lambda rows: rows, first: int = 0,
                 whole_bytes: int | None = None):
        self.tensors, self.per_batch, self.seed, self.sampled = dict(tensors), per_batch, seed, sampled
        #: Budget of tensors returned whole per forward pass (None: the capture's chunk budget).
        self.whole_bytes = whole_bytes
        self.position = {name: index for index, name in enumerate(order)}
        self.threads, self.keep, self.first = threads, keep, first
        self.gathered: dict[str, tuple[int, int, int]] = {}
        self.counts: dict[str, list[int]] = {}
        self.computed: list[str] = []
        self.outputs: list[str] = []
        self.inputs: set[str] = set()
        #: {tensor: {batch index: rows (n, C)}}, filled by ``consume``.
        self.samples: dict[str, dict[int, np.ndarray]] = {name: {} for name in tensors}
        #: Bytes per sample (one row of the batch axis) of each tensor as float32, from ``expect``.
        self.sample_bytes: dict[str, int] = {}
        self.done = False

    def expect(self, stats: Mapping) -> None:
        """Learn each tensor's size per sample from its range statistics on other rows of the same
        data ({name: TensorStats} with per-position ranges): C × positions float32 values."""
        for name in self.tensors:
            found = stats.get(name)
            if found is not None and found.index_min is not None:
                self.sample_bytes[name] = 4 * found.channel_min.size * found.index_min.size

    def _fit_whole(self, names: Sequence[str], batches: Sequence[CalibrationBatch], budget: int) -> bool:
        """Whether ``names`` returned whole stay within ``budget`` bytes per forward pass (sizes known)."""
        if not names or any(name not in self.sample_bytes for name in names):
            return False
        size = max(batch.batch_size for batch in batches)
        return sum(self.sample_bytes[name] for name in names) * size <= budget

    def attach(self, skel: Skeleton, runner: OutputRunner, batches: Sequence[CalibrationBatch],
               proto: onnx.ModelProto) -> None:
        """Plan the draws on ``skel`` (probing run-time shapes where needed) and add the row
        outputs to ``proto``, a copy of ``skel.proto`` that may already hold other capture nodes."""
        runner.check(list(self.tensors))
        self.inputs = set(runner.graph_inputs)
        sampled = list(batches[:self.sampled])
        whole = []
        for name, axis in self.tensors.items():
            if name in runner.graph_inputs:
                continue
            static = _static_rows(runner, name, axis, sampled)
            if static is None:
                whole.append(name)
            else:
                self.gathered[name], self.counts[name] = static
        budget = default_chunk_bytes(skel.weight_bytes) if self.whole_bytes is None else self.whole_bytes
        if whole and self._fit_whole(whole, sampled, budget):
            log.info("%d of %d sampled tensors have no static row count: returned whole (%.0f MiB per "
                     "sample) and drawn in numpy", len(whole), len(self.tensors),
                     sum(self.sample_bytes[name] for name in whole) / 2**20)
        elif whole:
            shapes = probe_shapes(skel, whole, sampled, self.threads)
            log.info("%d of %d sampled tensors have no static row count: shapes probed in %d forward pass(es)",
                     len(whole), len(self.tensors), len(shapes))
            for name in list(whole):
                probed = _probed_rows(shapes, name, self.tensors[name], sampled)
                if probed is not None:
                    whole.remove(name)
                    self.gathered[name], self.counts[name] = probed
            if whole:
                log.info("%d sampled tensors returned whole and drawn in numpy", len(whole))
        self.computed = [*self.gathered, *whole]
        nodes, inits, inputs, self.outputs = _row_nodes(runner, self.gathered, whole)
        insert_after_producers(proto.graph, nodes)  # each capture node frees its tensor early
        proto.graph.initializer.extend(inits)
        proto.graph.input.extend(inputs)
        proto.graph.output.extend(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                                  for out in self.outputs)

    def feeds(self, local: int) -> dict[str, np.ndarray]:
        """The row indices of batch ``local`` (its position in the pass): the seeded draw, or none."""
        return {f"qcompile_rows/{i}/indices":
                draw_rows(self.counts[name][local], self.per_batch, self.seed, self.position[name], self.first + local)
                if local < self.sampled else np.zeros(0, np.int64)
                for i, name in enumerate(self.gathered)}

    def wanted(self, local: int) -> list[str]:
        return self.outputs if local < self.sampled else []

    def consume(self, local: int, batch: CalibrationBatch, values: Sequence[np.ndarray]) -> None:
        """Store batch ``local``'s rows: graph inputs drawn from its feeds, the rest from ``values``
        (the outputs ``wanted(local)`` named)."""
        if local >= self.sampled:
            return
        b = self.first + local
        for name in self.tensors:
            if name in self.inputs:
                if name not in batch.feeds:
                    raise QCompileError(f"{batch.source}: calibration batch lacks model input {name}")
                self.samples[name][b] = self.keep(_draw_from(batch.feeds[name], self.tensors[name],
                                                             self.per_batch, self.seed, self.position[name], b))
        for name, value in zip(self.computed, values):
            self.samples[name][b] = self.keep(
                np.asarray(value, np.float32) if name in self.gathered
                else _draw_from(value, self.tensors[name], self.per_batch, self.seed, self.position[name], b))
        self.done = local + 1 >= self.sampled


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
    sampler = RowSampler(tensors, per_batch, seed, order, len(batches), threads, keep, first)
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    del proto.graph.output[:]
    sampler.attach(skel, runner, batches, proto)
    session = make_session(Skeleton(proto, skel.arrays), threads=threads, lean=True) if sampler.outputs else None
    for local, batch in enumerate(batches):
        values = []
        if session is not None:
            values = run_batch(session, sampler.outputs,
                               CalibrationBatch({**batch.feeds, **sampler.feeds(local)}, batch.metadata, batch.source))
        sampler.consume(local, batch, values)
        del values
    return sampler.samples


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
