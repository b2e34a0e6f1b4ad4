"""The one activation-capture engine: run the model in ORT with chosen tensors as outputs, in chunks.

Every consumer of intermediate activations (calibration statistics, OS+ row sampling, DMQ's
LES training inputs, per-timestep ranges, ``inspect``) calls :func:`stream_tensors`. It works on
a ``Skeleton`` (``qcompiler.skeleton``), so the weights are never serialized or copied: ORT
computes on the graph's own arrays, with prepacking and the memory arena off.

Chunks are sized from the model: each tensor's bytes per batch are estimated from its inferred
shape (open dims taken as the batch size), and tensors are packed into runs of at most
``StatsConfig.chunk_bytes`` (by default an eighth of the memory available when capture starts and
at most a quarter of the weights' size, between 256 MiB and 2 GiB) and ``tensors_per_run`` tensors.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from tqdm import tqdm

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.errors import QCompileError
from qcompiler.memory import forward_pass_allocations, trim_heap
from qcompiler.runtimes.ort import make_session

log = logging.getLogger(__name__)

#: Bounds of the automatic chunk budget (bytes of captured activations per ORT run and batch).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 256 * 2**20, 2 * 2**30


def available_memory() -> int:
    """Bytes the OS says a new allocation can get without swapping (MemAvailable; sysconf fallback)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_chunk_bytes(weight_bytes: int = 0) -> int:
    """An eighth of the available memory, at most a quarter of the weights' size, within [256 MiB, 2 GiB].

    The weight bound keeps a compile's peak near the model's own size (an SD-1.5 UNet: ~860 MB of
    activations per run beside its 3.4 GB of weights); small models get the 256 MiB floor.
    """
    budget = available_memory() // 8
    if weight_bytes:
        budget = min(budget, weight_bytes // 4)
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, budget)))


def as_skeleton(model):
    """A ``Skeleton`` of a ModelProto, a path or a Skeleton (paths are memory-mapped, not read)."""
    from qcompiler.graph import load_graph, to_graph, to_skeleton
    from qcompiler.skeleton import Skeleton

    if isinstance(model, Skeleton):
        return model
    if isinstance(model, onnx.ModelProto):
        return to_skeleton(to_graph(model), model)
    template, graph = load_graph(model)
    return to_skeleton(graph, template)


class OutputRunner:
    """ORT sessions over one skeleton whose graph outputs are set to one chunk of tensors at a time."""

    def __init__(self, model, threads: int | None = None):
        from qcompiler.skeleton import Skeleton

        skel = as_skeleton(model)
        proto = onnx.ModelProto()
        proto.CopyFrom(skel.proto)  # outputs are rewritten per chunk; the caller's skeleton stays as it is
        self.skeleton = Skeleton(proto, skel.arrays)
        self.threads = threads
        graph = proto.graph
        self.initializers = {tensor.name for tensor in graph.initializer}
        self.graph_inputs = {value.name for value in graph.input if value.name not in self.initializers}
        self.node_outputs = {name for node in graph.node for name in node.output if name}
        #: The model's own outputs (``session`` replaces the proto's outputs by each chunk).
        self.model_outputs = [value.name for value in graph.output]
        self._value_info = {v.name: v for v in (*graph.input, *graph.output, *graph.value_info)}

    def check(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self.initializers and name not in self.graph_inputs:
                raise QCompileError(f"tensor '{name}' is a constant initializer, not an activation; "
                                    "read weight statistics from the initializer itself")
            if name not in self.graph_inputs and name not in self.node_outputs:
                raise QCompileError(f"tensor '{name}' is not in the model (neither a graph input nor a node "
                                    "output); check the name, e.g. in Netron")

    def element_type(self, name: str) -> int:
        value = self._value_info.get(name)
        return (value.type.tensor_type.elem_type if value is not None else 0) or onnx.TensorProto.FLOAT

    def dims(self, name: str):
        """The tensor's inferred dims (TensorShapeProto.Dimension list), None when unknown."""
        value = self._value_info.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return None
        return list(value.type.tensor_type.shape.dim)

    def rank(self, name: str) -> int | None:
        """The tensor's rank from shape inference, None when unknown."""
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def estimated_bytes(self, name: str, batch_size: int) -> int:
        """Bytes of one batch's value of ``name`` from its inferred shape; open dims count as the batch."""
        value = self._value_info.get(name)
        if value is None or not value.type.tensor_type.HasField("shape"):
            return 0  # unknown: packed by count only
        dims = [d.dim_value if d.HasField("dim_value") else batch_size for d in value.type.tensor_type.shape.dim]
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.element_type(name))).itemsize
        return math.prod(dims) * itemsize

    def chunks(self, names: Sequence[str], batch_size: int, max_count: int, max_bytes: int) -> list[list[str]]:
        """Consecutive runs of ``names`` within ``max_count`` tensors and ``max_bytes`` (a bigger one runs alone)."""
        chunks: list[list[str]] = []
        current, used = [], 0
        for name in names:
            size = self.estimated_bytes(name, batch_size)
            if current and (len(current) >= max_count or used + size > max_bytes):
                chunks.append(current)
                current, used = [], 0
            current.append(name)
            used += size
        return chunks + [current] if current else chunks

    def session(self, chunk: Sequence[str]):
        """An ORT session whose only outputs are ``chunk`` (ORT prunes the nodes they do not need)."""
        graph = self.skeleton.proto.graph
        del graph.output[:]
        graph.output.extend(onnx.helper.make_tensor_value_info(n, self.element_type(n), None) for n in chunk)
        return make_session(self.skeleton, threads=self.threads, lean=True)


def run_batch(session, chunk: Sequence[str], batch: CalibrationBatch) -> list[np.ndarray]:
    """One forward pass; feeds limited to the inputs that the pruned graph still has."""
    names = [value.name for value in session.get_inputs()]
    missing = [name for name in names if name not in batch.feeds]
    if missing:
        raise QCompileError(f"{batch.source}: calibration batch lacks model input(s) {', '.join(missing)}")
    try:
        with forward_pass_allocations():
            outputs = session.run(list(chunk), {name: batch.feeds[name] for name in names})
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
        raise QCompileError(f"{batch.source}: ONNX Runtime failed while capturing activations: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    trim_heap()  # the forward pass's freed activations
    return outputs


def stream_tensors(model, batches: Sequence[CalibrationBatch], tensors: Sequence[str], config=None,
                   desc: str = "calibration statistics") -> Iterator[tuple[CalibrationBatch, dict[str, np.ndarray]]]:
    """``(batch, {tensor: value})`` per chunk of tensors and per batch.

    ``model``: a ModelProto, a path or a ``Skeleton``; ``config``: a ``StatsConfig``. Graph
    inputs come straight from the feeds; other tensors are computed by ORT with only the chunk
    as graph outputs, one pass over the data per chunk. The caller must drop each dict before
    asking for the next, so two batches' activations never coexist (the memory bound).
    """
    from qcompiler.calibration.statistics import StatsConfig

    config = config or StatsConfig()
    runner = OutputRunner(model, config.threads)
    runner.check(list(tensors))
    from_feeds = [name for name in tensors if name in runner.graph_inputs]
    computed = [name for name in tensors if name not in runner.graph_inputs]
    batch_size = max((batch.batch_size for batch in batches), default=1)
    budget = config.chunk_bytes or default_chunk_bytes(runner.skeleton.weight_bytes)
    chunks = runner.chunks(computed, batch_size, config.tensors_per_run, budget)
    log.info("%s: %d tensors in %d run(s) per batch (budget %.0f MiB)", desc, len(computed), len(chunks),
             budget / 2**20)
    with tqdm(total=(len(chunks) + bool(from_feeds)) * len(batches), desc=desc, unit="batch", leave=False,
              disable=None if config.progress else True) as bar:
        if from_feeds:
            for batch in batches:
                missing = [name for name in from_feeds if name not in batch.feeds]
                if missing:
                    raise QCompileError(f"{batch.source}: calibration batch lacks model input(s) "
                                        f"{', '.join(missing)}")
                yield batch, {name: batch.feeds[name] for name in from_feeds}
                bar.update()
        for chunk in chunks:
            session = runner.session(chunk)
            for batch in batches:
                outputs = dict(zip(chunk, run_batch(session, chunk, batch)))
                yield batch, outputs
                del outputs  # so two batches' outputs never coexist here
                bar.update()
            del session


__all__ = ["OutputRunner", "as_skeleton", "available_memory", "run_batch", "stream_tensors"]
