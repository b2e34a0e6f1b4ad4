"""Talk to a Triton server over HTTP with ``tritonclient``: one request, and a bounded load test.

Requests are built from the model's ``config.pbtxt`` so a feed dict shaped as ONNX Runtime
takes it (``{name: array}`` with the batch axis first) goes to Triton as that config declares
it (a per-request scalar with ``reshape { shape: [] }`` travels as ``[batch, 1]``), and the
outputs come back in ORT's shapes, ready to compare with a direct ORT run.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

#: numpy dtype -> Triton's wire dtype name (the HTTP/JSON protocol's names).
WIRE_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.float64): "FP64",
               np.dtype(np.int8): "INT8", np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32",
               np.dtype(np.int64): "INT64", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
               np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.bool_): "BOOL"}


def wire_inputs(config, feeds: dict[str, np.ndarray]):
    """``tritonclient.http.InferInput`` list for ``feeds`` laid out as ``config`` declares."""
    from tritonclient.http import InferInput

    inputs = []
    for entry in config.input:
        array = np.ascontiguousarray(feeds[entry.name])
        if entry.HasField("reshape") and config.max_batch_size > 0:
            array = array.reshape(array.shape[0], *entry.dims)
        item = InferInput(entry.name, list(array.shape), WIRE_DTYPES[array.dtype])
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    return inputs


def infer(client, config, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request; outputs in ORT's shapes (a ``reshape``'d output loses its trailing 1)."""
    result = client.infer(config.name, wire_inputs(config, feeds))
    outputs = {}
    for entry in config.output:
        value = result.as_numpy(entry.name)
        if entry.HasField("reshape") and config.max_batch_size > 0:
            value = value.reshape(value.shape[0], *entry.reshape.shape)
        outputs[entry.name] = value
    return outputs


@dataclass(frozen=True)
class LoadReport:
    """What a bounded load test measured: every request's latency and whether it failed."""

    clients: int
    requests_per_client: int
    completed: int
    failed: int
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    wall_s: float
    first_error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def load_test(url: str, config, feeds: dict[str, np.ndarray], clients: int = 8, requests: int = 50) -> LoadReport:
    """``clients`` threads, each with its own HTTP connection, send ``requests`` requests one after another.

    Stops by itself after ``clients × requests`` requests; latency is the client-side round trip
    of each request; p99 is the nearest-rank percentile of all of them.
    """
    from tritonclient.http import InferenceServerClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(_: int) -> None:
        client = InferenceServerClient(url, connection_timeout=60.0, network_timeout=120.0)
        try:
            inputs = wire_inputs(config, feeds)
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    client.infer(config.name, inputs)
                except Exception as exc:  # every failure is counted, never raised out of the test
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    p99 = ordered[min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)]
    return LoadReport(clients=clients, requests_per_client=requests, completed=len(latencies), failed=len(errors),
                      p50_ms=1e3 * statistics.median(ordered), p99_ms=1e3 * p99,
                      throughput_rps=len(latencies) / wall, wall_s=wall, first_error=errors[0] if errors else None)
