"""Models over 2 GiB without ever serializing their weights: memory-mapped loads, skeletons, streamed saves.

Protobuf cannot serialize a message over 2 GiB, and every copy of the weights of an SD-sized UNet
costs 3.3 GB. So weights live in exactly one place, the ``onnx_graphsurgeon`` graph's constants:

- :func:`map_external_weights` points the graph's constants at the model's external-data files
  through copy-on-write memory maps: loading reads no weight, and a pass that replaces a weight
  lets its mapping go;
- :func:`skeleton` exports the graph with every constant of at least ``INLINE_BYTES`` replaced by an
  external-data placeholder (dims and type, no data), the arrays kept by reference beside it. A
  skeleton serializes in milliseconds at any model size: shape inference, ORT sessions
  (``runtimes.ort.make_session``, which hands ORT the arrays themselves) and saving all use it;
- :func:`save_skeleton` streams the arrays into ``<name>.data`` one at a time (temp folder, then
  rename), or inlines them when the model is small enough for one file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from tqdm import tqdm

from qcompiler.errors import QCompileError

log = logging.getLogger(__name__)

#: Constants smaller than this stay inline: shape inference and ORT read them (Reshape shapes, axes).
INLINE_BYTES = 1024
#: Types stored two values per byte: their numpy form (one per byte) cannot stand for the file's bytes.
PACKED_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
#: Below this many weight bytes a model is saved as one self-contained .onnx file.
SINGLE_FILE_LIMIT = int(1.8 * 2**30)
#: Offsets in the external-data file are aligned like onnx's own writer (page size), so ORT may map them.
ALIGNMENT = 4096
#: The placeholder file name recorded in a skeleton's external references.
PLACEHOLDER = "qcompile.weights"


@dataclass
class Skeleton:
    """A model whose large constants are external placeholders, with their arrays held by reference."""

    proto: onnx.ModelProto
    arrays: dict[str, np.ndarray]

    @property
    def weight_bytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def materialize(self) -> onnx.ModelProto:
        """A self-contained ModelProto (a copy with every weight inline); only for models under 2 GiB."""
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        for tensor in _placeholders(model):
            array = self.arrays[tensor.name]
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = np.ascontiguousarray(array).tobytes()
        return model


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for ``onnx.checker``: placeholder initializers become typed graph inputs (no data to find)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [tensor for tensor in copy.graph.initializer if tensor.data_location != onnx.TensorProto.EXTERNAL]
    for tensor in copy.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            copy.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy


def _placeholders(model: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _numpy_dtype(data_type: int):
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except KeyError:
        return None


def map_external_weights(graph: gs.Graph, folder: Path) -> int:
    """Give every constant stored in external data a copy-on-write memory map; return bytes mapped.

    The file checks (present, long enough) are done by ``graph.load_model`` before this runs.
    """
    mapped = 0
    # Constant nodes keep their value in an attribute, which graph.tensors() does not list.
    attributes = [value for node in graph.nodes for value in node.attrs.values() if isinstance(value, gs.Constant)]
    for tensor in [*graph.tensors().values(), *attributes]:
        if not isinstance(tensor, gs.Constant) or not isinstance(tensor._values, LazyValues):
            continue
        proto = tensor._values.tensor
        if not isinstance(proto, onnx.TensorProto) or proto.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in proto.external_data}
        tensor.data_location = None  # else onnx-graphsurgeon exports the values marked as external
        dtype = _numpy_dtype(proto.data_type)
        shape = tuple(proto.dims)
        if dtype is None or np.dtype(dtype).kind not in "biuf":  # bfloat16/float8: onnx's own loader
            onnx.external_data_helper.load_external_data_for_tensor(proto, str(folder))
            continue
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            tensor.values = np.zeros(shape, dtype)
            continue
        tensor.values = np.memmap(folder / info["location"], dtype=dtype, mode="c",
                                  offset=int(info.get("offset", 0)), shape=shape)
        mapped += tensor.values.nbytes
    return mapped


def fresh_map(array: np.ndarray) -> np.ndarray:
    """A new copy-on-write map of a memory-mapped weight (no pages resident yet); other arrays as they are.

    Once the old map loses its last reference it is unmapped and the pages it read leave this
    process's resident set; the file's page cache stays with the OS.
    """
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return np.memmap(array.filename, dtype=array.dtype, mode="c", offset=array.offset, shape=array.shape)
    return array


@contextlib.contextmanager
def _placeholder_constants(graph: gs.Graph, arrays: dict[str, np.ndarray]):
    """While exporting, large constants become dataless LazyValues; their arrays go to ``arrays``."""
    swapped: list[tuple[gs.Constant, object]] = []
    offset = 0
    try:
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            if isinstance(tensor._values, LazyValues) and tensor._values.tensor.data_type in PACKED_TYPES:
                continue  # int4 stays packed in the proto (half the bytes of its numpy form)
            nbytes = tensor._values.nbytes if isinstance(tensor._values, LazyValues) else tensor.values.nbytes
            if nbytes < INLINE_BYTES:
                continue
            values = tensor.values
            if _numpy_dtype(onnx.helper.np_dtype_to_tensor_dtype(values.dtype)) is None:
                continue
            placeholder = onnx.TensorProto(name=tensor.name, dims=values.shape,
                                           data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),
                                           data_location=onnx.TensorProto.EXTERNAL)
            placeholder.external_data.add(key="location", value=PLACEHOLDER)
            placeholder.external_data.add(key="offset", value=str(offset))
            placeholder.external_data.add(key="length", value=str(values.nbytes))
            offset += -(-values.nbytes // ALIGNMENT) * ALIGNMENT
            arrays[tensor.name] = values
            swapped.append((tensor, values))
            tensor.values = LazyValues(placeholder)
        yield
    finally:
        for tensor, values in swapped:
            tensor.values = values


def skeleton(graph: gs.Graph, export) -> Skeleton:
    """Export ``graph`` with ``export(graph) -> ModelProto`` while its large constants are placeholders."""
    arrays: dict[str, np.ndarray] = {}
    with _placeholder_constants(graph, arrays):
        proto = export(graph)
    constants_late(proto.graph)
    used = {tensor.name for tensor in _placeholders(proto)}
    return Skeleton(proto, {name: arrays[name] for name in used})


def constants_late(graph: onnx.GraphProto) -> None:
    """Move each node that reads only initializers (a weight's DequantizeLinear) to just before its
    first reader. Still a topological order; why: calibration sessions run nodes in file order
    (``runtimes.ort.make_session(lean=True)``), and with every DQ first a model's dequantized
    float weights would all be alive at once (measured on PixArt-α minmax: peak 4.19 → 2.78 GiB
    with this order). Done on the weightless proto: milliseconds at any size."""
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return  # subgraphs read outer values implicitly: keep the exporter's order
    initializers = {tensor.name for tensor in graph.initializer}
    late = {index: node for index, node in enumerate(graph.node)
            if node.input and all(not name or name in initializers for name in node.input)}
    if not late:
        return
    produced_by = {out: index for index, node in late.items() for out in node.output}
    ordered: list[onnx.NodeProto] = []
    placed: set[int] = set()

    def place(index: int) -> None:
        if index not in placed:
            placed.add(index)
            ordered.append(late[index])

    outputs = {value.name for value in graph.output}
    for index, node in enumerate(graph.node):
        if index in late:
            if any(out in outputs for out in node.output):
                place(index)  # a graph output: no reader to wait for
            continue
        for name in node.input:
            if name in produced_by:
                place(produced_by[name])
        ordered.append(node)
    ordered += [late[index] for index in late if index not in placed]  # read by nothing (or only subgraphs)
    del graph.node[:]
    graph.node.extend(ordered)


def insert_after_producers(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> None:
    """Add ``nodes`` (reading the graph's tensors or each other) each right after the last producer
    of its inputs, not at the end. Why: calibration sessions run nodes in file order
    (``runtimes.ort.make_session(lean=True)``), so a capture node appended at the end (a ReduceMin
    of one activation, a Gather of its rows) would keep that activation alive through the whole
    forward pass, every captured one at once. Placed this way, each is freed after its last reader
    as usual: PixArt-α's calibration forward pass (175 tensors reduced) peaks at 0.25 GiB of
    activations beside its weights, 1.28 GiB when the reductions run last (ORT's default order)."""
    position = {name: index for index, node in enumerate(graph.node) for name in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    for node in nodes:
        anchor = max((position.get(name, -1) for name in node.input if name), default=-1)
        after.setdefault(anchor, []).append(node)
        position.update({name: anchor for name in node.output})
    ordered = list(after.get(-1, []))
    for index, node in enumerate(graph.node):
        ordered.append(node)
        ordered += after.get(index, [])
    del graph.node[:]
    graph.node.extend(ordered)


def open_skeleton(path: str | os.PathLike) -> Skeleton:
    """A model saved by :func:`save_skeleton` as a ``Skeleton`` again: the proto exactly as written
    (its value infos included, no graph round trip or new shape inference, so a process that opens
    it sees the graph its writer had) and each external weight memory-mapped (copy-on-write: the file
    is never written)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in _placeholders(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype, shape = _numpy_dtype(tensor.data_type), tuple(tensor.dims)
        if dtype is None:
            raise QCompileError(f"{path}: external tensor '{tensor.name}' has a type numpy cannot map")
        if int(np.prod(shape, dtype=np.int64)) == 0:
            arrays[tensor.name] = np.zeros(shape, dtype)
        else:
            arrays[tensor.name] = np.memmap(path.parent / info["location"], dtype=dtype, mode="c",
                                            offset=int(info.get("offset", 0)), shape=shape)
        # Point it at the session's placeholder file, as ``skeleton`` does (the data comes from ``arrays``).
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=PLACEHOLDER)
        tensor.external_data.add(key="offset", value=str(offset))
        tensor.external_data.add(key="length", value=str(arrays[tensor.name].nbytes))
        offset += -(-arrays[tensor.name].nbytes // ALIGNMENT) * ALIGNMENT
    return Skeleton(proto, arrays)


def placeholder_file_size(model: onnx.ModelProto) -> int:
    end = 0
    for tensor in _placeholders(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        end = max(end, int(info["offset"]) + int(info["length"]))
    return end


def write_placeholder_model(skel: Skeleton, folder: Path, name: str = "model.onnx") -> Path:
    """The skeleton as a file ORT can open: the .onnx plus a sparse placeholder of the right length.

    The placeholder holds no data (a sparse file uses no disk); ORT gets the real arrays from
    ``SessionOptions.add_initializer`` and never reads it.
    """
    path = folder / name
    onnx.save(skel.proto, str(path))
    with open(folder / PLACEHOLDER, "wb") as handle:
        handle.truncate(placeholder_file_size(skel.proto))
    return path


@contextlib.contextmanager
def staged_output(path: Path):
    """A temporary folder beside ``path`` to write into; the caller renames its files into place.

    The output folder is checked first (exists, writable); an OSError becomes one QCompileError
    naming ``path``; the folder and whatever was not renamed out of it are removed in any case.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise QCompileError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise QCompileError(f"{path}: output folder {folder} is not writable")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    try:
        yield staging
    except OSError as exc:
        raise QCompileError(f"{path}: could not write output ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_skeleton(skel: Skeleton, path: Path, external_data: bool | None = None) -> Path:
    """Write the model atomically; weights stream into ``<name>.data`` above ``SINGLE_FILE_LIMIT``."""
    path = Path(path)
    if external_data is None:
        external_data = skel.weight_bytes > SINGLE_FILE_LIMIT
    with staged_output(path) as staging:
        staged = staging / path.name
        if not external_data:
            onnx.save(skel.materialize(), str(staged))
        else:
            data_name = path.name + ".data"
            model = onnx.ModelProto()
            model.CopyFrom(skel.proto)
            _stream_weights(model, skel.arrays, staging / data_name, data_name)
            onnx.save(model, str(staged))
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


def _stream_weights(model: onnx.ModelProto, arrays: dict[str, np.ndarray], data_path: Path, location: str) -> None:
    """Write each array at an aligned offset and point its tensor there; one array in memory at a time."""
    tensors = list(_placeholders(model))
    total = sum(arrays[tensor.name].nbytes for tensor in tensors)
    with open(data_path, "wb") as handle, tqdm(total=total, desc=f"writing {location}", unit="B", unit_scale=True,
                                              leave=False, disable=None) as bar:
        for tensor in tensors:
            offset = -(-handle.tell() // ALIGNMENT) * ALIGNMENT
            handle.seek(offset)
            data = np.ascontiguousarray(arrays[tensor.name])
            handle.write(data.reshape(-1).view(np.uint8))
            del tensor.external_data[:]
            tensor.external_data.add(key="location", value=location)
            tensor.external_data.add(key="offset", value=str(offset))
            tensor.external_data.add(key="length", value=str(data.nbytes))
            bar.update(data.nbytes)
