"""Calibration data readers: a folder of .npz files, a Python callable, or ORT's reader, validated.

The project-wide format is a folder of ``.npz`` files read in file-name order. Each file's
keys are model input names and every array has a leading batch axis (the batch may be >1).
Keys starting with ``__`` (``__timestep__`` of shape (batch,), ``__label__``) are metadata:
kept beside the batch, never fed to the model.

Every reader is both ORT-compatible (``get_next() -> dict | None`` and ``rewind()``, the
``CalibrationDataReader`` protocol) and iterable over ``CalibrationBatch`` (each iteration
starts again from the first batch). ``load_calibration`` reads a source once and checks it
against the model's graph inputs, so a bad file fails here with its name and the tensor,
not deep inside ONNX Runtime.
"""

from __future__ import annotations

import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompileError

#: Keys with this prefix are metadata (timestep, label), not model inputs.
METADATA_PREFIX = "__"

#: Per graph input: numpy dtype and dims, ``None`` where the model leaves them open.
InputSpec = tuple[np.dtype | None, list[int | None] | None]


@dataclass(frozen=True)
class CalibrationBatch:
    """One batch of model feeds, its metadata, and where it came from (a file name)."""

    feeds: dict[str, np.ndarray]
    metadata: dict[str, np.ndarray]
    source: str

    @property
    def batch_size(self) -> int:
        """Leading-axis length of the first feed with a batch axis (1 if all feeds are scalars)."""
        for value in self.feeds.values():
            if np.ndim(value) >= 1:
                return int(np.shape(value)[0])
        return 1


def _split(arrays: Mapping[str, object], source: str) -> CalibrationBatch:
    """Separate model feeds from ``__metadata__`` keys."""
    feeds = {k: np.asarray(v) for k, v in arrays.items() if not k.startswith(METADATA_PREFIX)}
    metadata = {k: np.asarray(v) for k, v in arrays.items() if k.startswith(METADATA_PREFIX)}
    return CalibrationBatch(feeds=feeds, metadata=metadata, source=source)


class _Reader(ABC):
    """ORT's ``get_next``/``rewind`` protocol on top of ``__iter__`` over CalibrationBatch."""

    _cursor: Iterator[CalibrationBatch] | None = None

    @abstractmethod
    def __iter__(self) -> Iterator[CalibrationBatch]:
        """Every batch from the first; a new call starts over."""

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch's model feeds (metadata dropped), or None when the data is exhausted."""
        if self._cursor is None:
            self._cursor = iter(self)
        batch = next(self._cursor, None)
        return None if batch is None else dict(batch.feeds)

    def rewind(self) -> None:
        """Start ``get_next`` again from the first batch."""
        self._cursor = None


class NpzFolderReader(_Reader):
    """The ``.npz`` files of a folder, sorted by file name; one file is one batch.

    Files are opened one at a time, so only the current batch is in memory while iterating.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise QCompileError(f"{self.folder}: calibration folder not found; pass a folder of .npz files")
        if not self.folder.is_dir():
            raise QCompileError(f"{self.folder}: is a file, expected a folder of .npz calibration files")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix == ".npz" and p.is_file())
        if not self.files:
            raise QCompileError(
                f"{self.folder}: no .npz files in the calibration folder; "
                "write one per batch with numpy.savez(path, **{input_name: array})"
            )

    def __iter__(self) -> Iterator[CalibrationBatch]:
        for path in self.files:
            yield _split(_read_npz(path), path.name)

    def __len__(self) -> int:
        return len(self.files)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of one .npz, loaded eagerly so the file is closed on return."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # else np.load would take it for a pickle
        raise QCompileError(f"{path}: not a readable .npz file (not a zip archive); re-save it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "object arrays" in str(exc).lower():
            raise QCompileError(
                f"{path}: holds object arrays (pickled), which are not loaded for safety; "
                "save numeric arrays only"
            ) from None
        raise QCompileError(f"{path}: not a readable .npz file ({exc}); re-save it with numpy.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise QCompileError(
            f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); "
            "it may be truncated; re-save it with numpy.savez"
        ) from None


class CallableReader(_Reader):
    """Wrap ``fn() -> iterable of feed dicts``; ``fn`` is called again at every iteration.

    Dict keys starting with ``__`` are metadata, as in the .npz format.
    """

    def __init__(self, fn: Callable[[], Iterable[Mapping[str, object]]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __iter__(self) -> Iterator[CalibrationBatch]:
        for index, item in enumerate(self.fn()):
            yield _as_batch(item, f"{self.name}[{index}]")


def _as_batch(item: object, source: str) -> CalibrationBatch:
    if isinstance(item, CalibrationBatch):
        return item
    if not isinstance(item, Mapping):
        raise QCompileError(
            f"{source}: calibration item is a {type(item).__name__}, expected a dict of input name -> array"
        )
    return _split(item, source)


class _OrtReaderAdapter(_Reader):
    """Iterate an object with ORT's ``get_next()`` (e.g. an ``onnxruntime.quantization.CalibrationDataReader``)."""

    def __init__(self, reader):
        self.reader = reader
        self.name = type(reader).__name__
        self._started = False

    def __iter__(self) -> Iterator[CalibrationBatch]:
        if self._started:
            if not callable(getattr(self.reader, "rewind", None)):
                raise QCompileError(f"{self.name}: calibration reader was already consumed and has no rewind()")
            self.reader.rewind()
        self._started = True
        index = 0
        while (item := self.reader.get_next()) is not None:
            yield _as_batch(item, f"{self.name}[{index}]")
            index += 1


def as_reader(source) -> _Reader:
    """A reader for a folder path, an ORT-style reader, a callable, or an iterable of feed dicts."""
    if isinstance(source, _Reader):
        return source
    if isinstance(source, (str, os.PathLike)):
        return NpzFolderReader(source)
    if callable(getattr(source, "get_next", None)):
        return _OrtReaderAdapter(source)
    if isinstance(source, Mapping):  # one feed dict: a single batch
        return CallableReader(lambda: [source], name="feeds")
    if callable(source):
        return CallableReader(source)
    if isinstance(source, Iterable):
        return CallableReader(lambda: source, name="calibration")
    raise QCompileError(
        f"calibration source of type {type(source).__name__} is not supported; pass a folder of .npz "
        "files, a reader with get_next(), a callable, or a list of dicts"
    )


def _expected_inputs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """Graph inputs that need data: name -> (dtype, dims); ``None`` where the model leaves it open.

    A dim is ``None`` when symbolic or unknown; dtype/dims are ``None`` for untyped inputs.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    expected = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
                 if tensor_type.elem_type != onnx.TensorProto.UNDEFINED else None)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else None
        expected[value.name] = (dtype, dims)
    return expected


def _shape_text(dims: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def validate_batch(batch: CalibrationBatch, expected: Mapping[str, InputSpec]) -> None:
    """Check one batch against the model inputs: keys, dtype, rank, static dims, finiteness, batch axis."""
    where = batch.source
    names = ", ".join(expected)
    for name in expected:
        if name not in batch.feeds:
            raise QCompileError(
                f"{where}: missing model input '{name}' (file has: {', '.join(batch.feeds) or 'no inputs'}); "
                f"every calibration file needs all of: {names}"
            )
    unknown = [key for key in batch.feeds if key not in expected]
    if unknown:
        raise QCompileError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; the model's inputs are {names} "
            f"(prefix metadata keys with '{METADATA_PREFIX}')"
        )
    for name, (dtype, dims) in expected.items():
        value = batch.feeds[name]
        if dtype is not None and value.dtype != dtype:
            raise QCompileError(
                f"{where}: input '{name}' has dtype {value.dtype}, the model expects {dtype}; "
                f"convert it with .astype(np.{dtype.name})"
            )
        if dims is not None and (value.ndim != len(dims) or any(
                d is not None and d != got for d, got in zip(dims, value.shape))):
            raise QCompileError(
                f"{where}: input '{name}' has shape {tuple(value.shape)}, the model expects {_shape_text(dims)} "
                "('?' = any size); re-save the data in that shape"
            )
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            count = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise QCompileError(
                f"{where}: input '{name}' has {count} non-finite value(s) (NaN/Inf); fix or remove this file"
            )
    sizes = {name: value.shape[0] for name, value in batch.feeds.items() if value.ndim >= 1}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise QCompileError(
            f"{where}: inputs have different batch sizes ({listed}); all arrays of a file need the same leading axis"
        )


def _head(batch: CalibrationBatch, count: int) -> CalibrationBatch:
    """The first ``count`` samples of a batch (metadata sliced where it has the batch axis)."""
    size = batch.batch_size

    def cut(value: np.ndarray) -> np.ndarray:
        return value[:count] if value.ndim >= 1 and value.shape[0] == size else value

    return CalibrationBatch(
        feeds={k: cut(v) for k, v in batch.feeds.items()},
        metadata={k: cut(v) for k, v in batch.metadata.items()},
        source=batch.source,
    )


def load_calibration(source, model: onnx.ModelProto, limit: int | None = None) -> list[CalibrationBatch]:
    """Read every batch of ``source`` and validate it against ``model``'s graph inputs.

    ``limit`` caps the number of samples (not files); the last batch is cut to fit. Inputs
    backed by an initializer have a default and are not required.
    """
    if limit is not None and limit < 1:
        raise QCompileError(f"calibration limit must be a positive number of samples, got {limit}")
    expected = _expected_inputs(model)
    batches, samples = [], 0
    for batch in as_reader(source):
        validate_batch(batch, expected)
        if limit is not None and samples + batch.batch_size > limit:
            batch = _head(batch, limit - samples)
        batches.append(batch)
        samples += batch.batch_size
        if limit is not None and samples >= limit:
            break
    if not batches:
        raise QCompileError("calibration source yielded no batches; check the folder or the reader")
    return batches


def spread_batches(batches: list, count: int) -> list:
    """``count`` batches evenly spaced over ``batches`` (all when there are fewer), first and last included."""
    if len(batches) <= count:
        return list(batches)
    return [batches[i] for i in np.unique(np.linspace(0, len(batches) - 1, count).round().astype(int))]
