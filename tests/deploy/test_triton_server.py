"""A real Triton server on a `qcompile deploy` repository of the quantized UNet, driven by tritonclient over HTTP.

The server is the ``tritonserver`` 2.51 binary of PyPI's ``nvidia-pytriton``, started in a venv of
Debian's python3.11 (``qcompiler.deploy.pytriton_env``; built once and cached, about a minute), serving
the repository's model through its Python backend with an ONNX Runtime session (the config's
onnxruntime backend is not in that package). Skipped only where Debian's python3.11 is absent.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from qcompiler.deploy import pytriton_env
from qcompiler.deploy.client import infer, load_test, wire_inputs
from qcompiler.deploy.triton import TritonOptions, read_config, write_repository

pytestmark = [pytest.mark.slow, pytest.mark.server]

#: Direct ORT outputs vs Triton's: the same onnxruntime version and session options on both sides,
#: so only ORT's thread partitioning of float reductions may differ: the project's 1e-5 relative bound.
RELATIVE = 1e-5


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 1, 32, 32)).astype(np.float32),
            "timestep": rng.uniform(0, 1000, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 10, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def server(unet_minmax, tmp_path_factory):
    if not pytriton_env.SYSTEM_PYTHON.is_file():
        pytest.skip(f"{pytriton_env.SYSTEM_PYTHON} (Debian's python3.11) is not installed; the Triton server "
                    "needs it (apt-get install python3.11 python3.11-venv; .ci/run installs it)")
    repo = tmp_path_factory.mktemp("repo")
    folder = write_repository(unet_minmax, repo, TritonOptions(name="unet_minmax", max_batch=8, instances=2,
                                                                intra_op_threads=1))
    with pytriton_env.PyTritonServer(folder, repo / "tritonserver.log") as running:
        yield running, read_config(folder / "config.pbtxt"), unet_minmax


@pytest.fixture
def client(server):
    from tritonclient.http import InferenceServerClient

    connection = InferenceServerClient(server[0].url, network_timeout=120.0)
    yield connection
    connection.close()


def test_outputs_equal_direct_onnxruntime(server, client):
    _, config, model = server
    assert client.is_server_ready() and client.is_model_ready(config.name)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        feeds = _feeds(batch, seed=batch)
        served = infer(client, config, feeds)["noise_pred"]
        (direct,) = session.run(["noise_pred"], feeds)
        assert served.shape == direct.shape == (batch, 1, 32, 32)
        assert np.abs(served - direct).max() <= RELATIVE * np.abs(direct).max()


def test_bounded_load_has_no_failures(server, tmp_path):
    running, config, _ = server
    report = load_test(running.url, config, _feeds(1), clients=8, requests=25)
    print("load test:", json.dumps(report.as_dict()))
    assert report.failed == 0, report.first_error
    assert report.completed == 8 * 25
    assert 0 < report.p50_ms <= report.p99_ms and report.throughput_rps > 0


@pytest.mark.parametrize("case", ["shape", "dtype", "missing"])
def test_malformed_request_is_refused_and_the_server_keeps_serving(server, client, case):
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    running, config, _ = server
    feeds = _feeds(2)
    inputs = wire_inputs(config, feeds)
    if case == "shape":
        bad = InferInput("sample", [2, 1, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 1, 16, 16), np.float32))
        inputs[0] = bad
    elif case == "dtype":
        bad = InferInput("sample", [2, 1, 32, 32], "FP64")
        bad.set_data_from_numpy(feeds["sample"].astype(np.float64))
        inputs[0] = bad
    else:
        inputs = inputs[1:]
    with pytest.raises(InferenceServerException) as refused:
        client.infer(config.name, inputs)
    assert "sample" in str(refused.value)
    assert running.alive() and client.is_model_ready(config.name)
    assert infer(client, config, _feeds(1))["noise_pred"].shape == (1, 1, 32, 32)
