"""Serve a model folder written by ``qcompile deploy --triton`` in Triton, through PyTriton's Python backend.

    python pytriton_server.py REPO/NAME --http-port 8000 --grpc-port 8001 --metrics-port 8002

This is how qcompile tests a repository against a real Triton Inference Server where Triton's
onnxruntime backend is not installed: the ``tritonserver`` binary that the PyPI package
``nvidia-pytriton`` ships (Triton 2.51) has only the Python backend, so the model is served
by a Python callable that runs an ONNX Runtime session of ``REPO/NAME/1/model.onnx``. What
it takes from ``config.pbtxt`` (parsed with Triton's own ``ModelConfig`` schema): the model
name, ``max_batch_size`` (dynamic batching), the inputs and outputs with their dims and
``reshape``, the instance count (one ORT session each) and the onnxruntime backend's
parameters (thread counts, graph optimization level). Requests, batching, validation of shapes
and dtypes and the HTTP/GRPC protocols are Triton's own.

It runs in its own environment (PyTriton, onnxruntime, numpy; no qcompile import): the
backend stub of that Triton links Debian's libpython 3.11, so the interpreter must be
Debian's ``python3.11`` (``qcompiler.deploy.pytriton_env`` builds that environment). Prints
``READY <http port>`` on stdout once the model is ready; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import numpy as np

#: Triton DataType name -> numpy dtype (the types the config writer emits).
NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
                "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
                "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
                "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_, "TYPE_STRING": np.bytes_}
#: Triton onnxruntime backend's ``optimization.graph.level`` -> ORT GraphOptimizationLevel name.
ORT_LEVELS = {0: "ORT_ENABLE_ALL", -1: "ORT_ENABLE_BASIC", 1: "ORT_ENABLE_EXTENDED", 2: "ORT_DISABLE_ALL"}


def read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def make_session(model_path: Path, config):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[config.optimization.graph.level])
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", 0))
    options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", 0))
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def make_infer(session, config):
    """A callable for PyTriton: Triton's batched arrays -> the session's feeds -> Triton's output dims."""
    from pytriton.decorators import batch

    batching = config.max_batch_size > 0
    input_shapes = {entry.name: list(entry.reshape.shape) if entry.HasField("reshape") else None
                    for entry in config.input}
    output_dims = {entry.name: list(entry.dims) for entry in config.output}

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lead = [next(iter(inputs.values())).shape[0]] if batching else []
        feeds = {name: (array.reshape(lead + input_shapes[name]) if input_shapes[name] is not None else array)
                 for name, array in inputs.items()}
        results = session.run(list(output_dims), feeds)
        # An output declared dims [1] with reshape [] comes out of ORT as [batch]: give Triton [batch, 1].
        return {name: (value.reshape(lead + output_dims[name]) if value.ndim < len(lead + output_dims[name]) else value)
                for name, value in zip(output_dims, results)}

    if batching:
        return batch(lambda **inputs: run(inputs))

    def unbatched(requests):
        return [run(dict(request)) for request in requests]

    return unbatched


def serve(model_dir: Path, http_port: int, grpc_port: int, metrics_port: int) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = read_config(model_dir / "config.pbtxt")
    model_path = model_dir / "1" / (config.default_model_filename or "model.onnx")
    instances = sum(group.count for group in config.instance_group) or 1
    infer_funcs = [make_infer(make_session(model_path, config), config) for _ in range(instances)]

    def tensors(entries):
        return [Tensor(name=entry.name, dtype=NUMPY_DTYPES[_dtype_name(entry.data_type)], shape=tuple(entry.dims))
                for entry in entries]

    batching = config.max_batch_size > 0
    model_config = ModelConfig(batching=batching, max_batch_size=config.max_batch_size if batching else 0,
                               batcher=DynamicBatcher())
    triton_config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                                 grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_secs=5, log_verbose=0)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Triton(config=triton_config) as triton:
        triton.bind(model_name=config.name, infer_func=infer_funcs, inputs=tensors(config.input),
                    outputs=tensors(config.output), config=model_config, strict=True)
        triton.run()
        print(f"READY {http_port}", flush=True)
        stop.wait()


def _dtype_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="REPO/NAME folder written by qcompile deploy --triton")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    serve(args.model_dir, args.http_port, args.grpc_port, args.metrics_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
