"""Load, save and convert ONNX models: external data, atomic writes, shape inference, names.

The passes work on an ``onnx_graphsurgeon.Graph`` (disconnect -> insert -> cleanup().toposort());
this module converts between that and ``onnx.ModelProto`` and does all file I/O, so that
every bad input is reported here, with the file named, before any pass runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.errors import QCompileError

#: Protobuf cannot serialise a message over 2 GiB: above this, weights go to external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Leave headroom for the graph structure itself when deciding on external data.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
#: onnx 1.23 writes IR version 14 by default; ONNX Runtime 1.31 reads at most 13... keep models at 10.
MAX_IR_VERSION = 10


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (with its external data, if any); raise QCompileError on bad input."""
    path = Path(path)
    if not path.exists():
        raise QCompileError(f"{path}: model file not found")
    if path.is_dir():
        raise QCompileError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise QCompileError(f"{path}: file is empty, expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as exc:
        raise QCompileError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); "
            "the file may be truncated or of another format"
        ) from None
    if len(model.graph.node) == 0:
        raise QCompileError(f"{path}: ONNX graph has no nodes (truncated or empty model?)")
    if load_external_data:
        _check_external_files(model, path)
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise QCompileError(f"{path}: could not load external data ({exc})") from None
    return model


def load_structure(path: str | os.PathLike) -> onnx.ModelProto:
    """The model without its external weight data, after checking that every external file is complete."""
    model = load_model(path, load_external_data=False)
    _check_external_files(model, Path(path))
    return model


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    """Name the initializer and the file when a model's external weights are missing or short."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data_file = path.parent / info.get("location", "")
        if not data_file.is_file():
            raise QCompileError(
                f"{path}: external data file '{info.get('location')}' for initializer "
                f"'{tensor.name}' not found in {path.parent}; copy it next to the model"
            )
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if data_file.stat().st_size < end:
            raise QCompileError(
                f"{path}: external data file '{data_file.name}' is shorter than initializer "
                f"'{tensor.name}' needs ({data_file.stat().st_size} < {end} bytes); it is truncated"
            )


def model_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in initializers and Constant nodes (what decides external data)."""
    total = 0
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # "length" is optional: dims × item size
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        else:
            total += len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then rename.

    Models whose weights exceed ~1.8 GiB (or ``external_data=True``) are written with their
    weights in ``<name>.data`` beside the model. No partial file is ever left at ``path``.
    """
    from qcompiler.skeleton import staged_output

    path = Path(path)
    if external_data is None:
        external_data = model_weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with staged_output(path) as staging:
        staged = staging / path.name
        if external_data:
            # onnx moves weights out of the proto it saves: save a copy so the caller keeps its model.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=0)
            os.replace(staging / (path.name + ".data"), path.parent / (path.name + ".data"))
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
    return path


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (ORT's symbolic inference fails on BERT exports, docs/algorithms.md §9)."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        try:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort: passes check shapes they need
            return model
    return model


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon (shapes inferred first so patterns can read them)."""
    return gs.import_onnx(infer_shapes(model))


def check_acyclic(graph: gs.Graph, source: str) -> None:
    """QCompileError naming a node on a cycle (Kahn's algorithm over producer → consumer edges)."""
    from collections import deque

    waiting = {id(node): {id(p) for t in node.inputs for p in t.inputs} for node in graph.nodes}
    readers: dict[int, list] = {}
    for node in graph.nodes:
        for producer in waiting[id(node)]:
            readers.setdefault(producer, []).append(node)
    queue = deque(node for node in graph.nodes if not waiting[id(node)])
    done = 0
    while queue:
        node = queue.popleft()
        done += 1
        for reader in readers.get(id(node), []):
            waiting[id(reader)].discard(id(node))
            if not waiting[id(reader)]:
                queue.append(reader)
    if done < len(graph.nodes):
        node = next(n for n in graph.nodes if waiting[id(n)])
        raise QCompileError(f"{source}: the graph has a cycle through node '{node.name}' ({node.op}); an ONNX "
                            "graph must be acyclic")


def load_graph(path: str | os.PathLike, template: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, gs.Graph]:
    """``(template, graph)`` of a model file, its external weights memory-mapped, not read.

    The template is the model without external weight data (inputs, opsets, metadata); the
    graph's constants hold the weights. Models of any size load in seconds and hold each
    weight once (``qcompiler.skeleton``). ``template``: the file's ``load_structure`` when the
    caller already has it (not parsed twice).
    """
    from qcompiler.skeleton import map_external_weights

    path = Path(path)
    template = template if template is not None else load_structure(path)
    graph = to_graph(template)
    map_external_weights(graph, path.parent)
    return template, graph


def _export(graph: gs.Graph, template: onnx.ModelProto | None) -> onnx.ModelProto:
    graph.cleanup().toposort()
    # onnx-graphsurgeon does not export Node.doc_string; passes set it, so carry it across by name.
    doc_strings = {node.name: node.doc_string for node in graph.nodes if getattr(node, "doc_string", None)}
    model = gs.export_onnx(graph, do_type_check=False)
    for node in model.graph.node:
        if node.name in doc_strings:
            node.doc_string = doc_strings[node.name]
    declared = {entry.domain for entry in model.opset_import}
    for domain in sorted({node.domain for node in model.graph.node} - declared - {"ai.onnx"}):
        model.opset_import.add(domain=domain, version=1)  # com.microsoft contrib ops are version 1
    # Value infos for every inferable tensor, inserted ones included, so Netron shows their shapes.
    model = infer_shapes(model)
    if template is not None:
        # A target may raise the opset (TensorRT's int4 blocks need 21, so IR 10): never below what it needs.
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        model.ir_version = min(max(template.ir_version, needed), MAX_IR_VERSION)
        model.producer_name = template.producer_name or model.producer_name
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    return model


def to_skeleton(graph: gs.Graph, template: onnx.ModelProto | None = None):
    """The graph as a ``Skeleton``: structure in a small proto, weights by reference (any model size)."""
    from qcompiler.skeleton import skeleton

    return skeleton(graph, lambda g: _export(g, template))


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph back to one self-contained ONNX model, keeping the template's IR version and metadata.

    For models over 2 GiB use :func:`to_skeleton`: this copies every weight into the proto.
    """
    return to_skeleton(graph, template).materialize()


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set (or replace) ``metadata_props`` entries, which Netron shows in its model panel."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            model.metadata_props.add(key=key, value=str(value))


class NameScope:
    """Readable unique names for inserted nodes and tensors: ``<tensor>/<pass>/<Op>``."""

    def __init__(self, graph: gs.Graph):
        self._used = {node.name for node in graph.nodes} | set(graph.tensors().keys())

    def make(self, base: str, pass_name: str, suffix: str) -> str:
        name = f"{base}/{pass_name}/{suffix}"
        candidate, index = name, 1
        while candidate in self._used:
            candidate = f"{name}_{index}"
            index += 1
        self._used.add(candidate)
        return candidate


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The numpy value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.values
    return None


def opset_version(graph: gs.Graph) -> int:
    return int(graph.opset)


def add_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (typed from shape inference)."""
    inferred = infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    existing = {o.name for o in graph.output}
    extended = onnx.ModelProto()
    extended.CopyFrom(inferred)
    for name in names:
        if name in existing:
            continue
        if name in types and types[name].type.tensor_type.elem_type:
            extended.graph.output.append(types[name])
        else:
            extended.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return extended
