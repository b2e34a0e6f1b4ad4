"""Write a Triton Inference Server model repository for an ONNX model: ``qcompile deploy --triton``.

Layout (Triton's own): ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` with the
model's external data files beside it. The config targets Triton's onnxruntime backend
(``platform: "onnxruntime_onnx"``):

- inputs and outputs with their dtypes and dims read from the graph, dynamic axes as -1;
- batching: when every input and output has a dynamic leading axis, that axis becomes
  ``max_batch_size`` (dims then omit it) with the dynamic batcher; a tensor whose only axis is
  the batch axis is declared ``dims: [1]`` with ``reshape { shape: [] }``, Triton's idiom for it;
- ``instance_group``: N copies of the session, on CPU or GPU;
- the ORT settings a qcompile output needs: graph optimization level ``ORT_ENABLE_ALL`` (the QDQ
  fusions that turn the quantized GEMMs into integer kernels run at that level; Triton's level 0)
  and the thread counts, as the backend's ``parameters``.

The text is validated by parsing it into Triton's ``ModelConfig`` protobuf (the schema
``tritonclient`` ships), and the repository is written into a temporary folder that is renamed
into place, so a failed deploy leaves nothing behind.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from qcompiler.errors import MissingDependencyError, QCompileError

logger = logging.getLogger(__name__)

#: Names qcompile accepts: a Triton model name is a folder name and a URL path segment
#: (``/v2/models/NAME``), so only characters that are safe in both.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
#: Triton's model version folder qcompile writes.
VERSION = "1"
MODEL_FILENAME = "model.onnx"
#: ONNX element type -> Triton DataType name (model_config.proto).
TRITON_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
#: ``max_batch_size`` when the graph batches and the user gave none.
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class TritonOptions:
    """What ``qcompile deploy --triton`` writes besides what the graph says."""

    name: str
    max_batch: int | None = None  # None: DEFAULT_MAX_BATCH if the graph batches, else 0
    instances: int = 1
    kind: str = "cpu"  # cpu | gpu
    intra_op_threads: int = 0  # 0: ORT picks (one per core)
    force: bool = False


@functools.cache
def model_config_schema():
    """Triton's ``model_config_pb2`` module as ``tritonclient`` ships it.

    ``tritonclient.grpc`` refuses to import without its [grpc] extra (grpcio, and a protobuf
    pin older than the one onnx runs with here), but the generated schema module in it needs only
    protobuf, so it is loaded from its file.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("qcompile deploy", "tritonclient", "deploy")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise QCompileError(f"{path}: tritonclient's model_config_pb2 not found; reinstall tritonclient")
    module_spec = importlib.util.spec_from_file_location("model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise QCompileError(f"model name '{name}' is not a valid Triton model name: use letters, digits, "
                            "'_', '-' and '.' (not first), at most 128 characters; choose one with --name")
    return name


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """The tensor's dims, None for a dynamic axis; None when the graph gives no shape."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]


def _tensors(model: onnx.ModelProto, path: Path) -> tuple[list, list]:
    """(name, elem_type, dims) of the graph's real inputs and its outputs, shapes inferred where missing."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    outputs = list(model.graph.output)
    if any(_dims(value) is None for value in outputs):
        inferred = onnx.shape_inference.infer_shapes(model)
        outputs = list(inferred.graph.output)
    result = []
    for values in (inputs, outputs):
        rows = []
        for value in values:
            elem_type = value.type.tensor_type.elem_type
            if elem_type not in TRITON_DTYPES:
                raise QCompileError(f"{path}: tensor '{value.name}' has a type Triton cannot carry "
                                    f"({onnx.TensorProto.DataType.Name(elem_type) if elem_type else 'not a tensor'})")
            dims = _dims(value)
            if dims is None:
                raise QCompileError(f"{path}: tensor '{value.name}' has no shape in the graph; Triton needs its rank")
            rows.append((value.name, elem_type, dims))
        result.append(rows)
    return result[0], result[1]


def batchable(inputs: list, outputs: list) -> bool:
    """Every input and output has a dynamic leading axis: Triton may batch requests along it."""
    return all(dims and dims[0] is None for _, _, dims in inputs + outputs)


def build_config(model: onnx.ModelProto, path: Path, options: TritonOptions):
    """Triton's ``ModelConfig`` message for ``model`` (a structure: external weights not needed)."""
    schema = model_config_schema()
    inputs, outputs = _tensors(model, path)
    can_batch = batchable(inputs, outputs)
    max_batch = options.max_batch if options.max_batch is not None else (DEFAULT_MAX_BATCH if can_batch else 0)
    if max_batch < 0:
        raise QCompileError(f"--max-batch must be 0 or more, got {max_batch}")
    if max_batch > 0 and not can_batch:
        fixed = next(name for name, _, dims in inputs + outputs if not dims or dims[0] is not None)
        raise QCompileError(f"{path}: --max-batch {max_batch} needs a dynamic leading (batch) axis on every input "
                            f"and output, but tensor '{fixed}' has none; use --max-batch 0")
    config = schema.ModelConfig(name=options.name, platform="onnxruntime_onnx", max_batch_size=max_batch)
    for rows, field in ((inputs, config.input), (outputs, config.output)):
        for name, elem_type, dims in rows:
            shown = dims[1:] if max_batch > 0 else dims
            entry = field.add(name=name, data_type=schema.DataType.Value(TRITON_DTYPES[elem_type]))
            entry.dims.extend([-1 if dim is None else dim for dim in shown] or [1])
            if not shown:  # a scalar per request: Triton's idiom is dims [1] reshaped to []
                entry.reshape.SetInParent()
    if max_batch > 0:
        config.dynamic_batching.SetInParent()
    kind = {"cpu": schema.ModelInstanceGroup.KIND_CPU, "gpu": schema.ModelInstanceGroup.KIND_GPU}[options.kind]
    config.instance_group.add(count=options.instances, kind=kind)
    # Level 0 is ORT_ENABLE_ALL in Triton's onnxruntime backend (-1 basic, 1 extended, 2 none).
    config.optimization.graph.level = 0
    config.optimization.graph.SetInParent()
    for key, value in (("intra_op_thread_count", options.intra_op_threads), ("inter_op_thread_count", 1),
                       ("execution_mode", 0)):
        config.parameters[key].string_value = str(value)
    return config


def config_text(config, model: onnx.ModelProto) -> str:
    """``config.pbtxt``: a comment header, the message in protobuf text format, validated by parsing it back."""
    from google.protobuf import text_format

    body = text_format.MessageToString(config)
    recipe = {prop.key: prop.value for prop in model.metadata_props}
    header = ["# Triton model configuration written by qcompile deploy.",
              "# optimization.graph.level 0 = ORT_ENABLE_ALL: the level at which ONNX Runtime fuses",
              "# qcompile's QDQ pairs into integer kernels."]
    if "qcompile.recipe" in recipe:
        header.append(f"# qcompile recipe: {recipe['qcompile.recipe']}")
    text = "\n".join(header) + "\n" + body
    parsed = model_config_schema().ModelConfig()
    try:
        text_format.Parse(text, parsed)
    except text_format.ParseError as exc:  # a qcompile bug: the message came from the schema itself
        raise RuntimeError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc
    if parsed != config:
        raise RuntimeError("config.pbtxt does not round-trip through Triton's ModelConfig")
    return text


def read_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` into Triton's ``ModelConfig`` (raises QCompileError naming the file)."""
    from google.protobuf import text_format

    config = model_config_schema().ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(), config)
    except (OSError, text_format.ParseError) as exc:
        raise QCompileError(f"{path}: not a readable Triton model configuration ({exc})") from None
    return config


def _external_files(model: onnx.ModelProto, path: Path) -> list[str]:
    """Relative locations of the model's external data files (checked complete by load_structure)."""
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(info["location"])
    return sorted(locations)


def write_repository(model_path: str | os.PathLike, repo_dir: str | os.PathLike, options: TritonOptions) -> Path:
    """Write ``repo_dir/NAME`` for the model; returns that folder. Nothing is left half-written."""
    from qcompiler.graph import load_structure

    model_path, repo_dir = Path(model_path), Path(repo_dir)
    check_name(options.name)
    if options.instances < 1:
        raise QCompileError(f"--instances must be 1 or more, got {options.instances}")
    model = load_structure(model_path)
    target = repo_dir / options.name
    if repo_dir.exists() and not repo_dir.is_dir():
        raise QCompileError(f"{repo_dir}: exists and is not a folder; give a Triton model repository folder")
    if target.exists() and not options.force:
        raise QCompileError(f"{target}: the repository already holds a model named '{options.name}'; "
                            "choose another --name or pass --force to replace it")
    text = config_text(build_config(model, model_path, options), model)
    try:
        repo_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{options.name}.", dir=repo_dir))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the model from a server run as another user
    except OSError as exc:
        raise QCompileError(f"{repo_dir}: cannot write the repository ({exc.strerror or exc})") from None
    try:
        version = staging / VERSION
        version.mkdir()
        shutil.copyfile(model_path, version / MODEL_FILENAME)
        for location in _external_files(model, model_path):
            destination = version / location
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_path.parent / location, destination)
        (staging / "config.pbtxt").write_text(text)
        _replace(staging, target)
    except OSError as exc:
        raise QCompileError(f"{target}: could not write the repository ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote Triton model %s", target)
    return target


def _replace(staging: Path, target: Path) -> None:
    """Rename the staged folder into place; an existing one (--force) is moved aside first, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old / target.name, target)  # put the previous model back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
