"""qcompile view: Netron serves the quantized UNet and headless Chromium sees qcompile's nodes drawn.

Skipped only where no Chromium is installed (Debian's ``chromium`` package; .ci/run installs it).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

import onnx
import pytest

from qcompiler.cli.main import main
from qcompiler.deploy import netron_view
from qcompiler.deploy.netron_browser import chromium_path, render

#: Name parts of the nodes qcompile inserts: ``<tensor>/<pass>/<Op>``.
INSERTED = ("/quantize_weights/", "/insert_activation_qdq/", "/lower/")

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (Debian: apt-get "
                                    "install chromium; .ci/run installs it), so Netron's page cannot be rendered")


@pytest.fixture
def served():
    urls = []

    def serve(model):
        urls.append(netron_view.serve(model))
        return urls[-1]

    yield serve
    for url in urls:
        netron_view.stop(url)


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_netron_draws_the_inserted_nodes(unet_minmax, served, tmp_path):
    model = onnx.load(str(unet_minmax), load_external_data=False)
    inserted = {node.name for node in model.graph.node if any(part in node.name for part in INSERTED)}
    assert len(inserted) > 100  # 136 quantized GEMMs: weight DQs and activation Q/DQ pairs
    rendered = render(served(unet_minmax), png=tmp_path / "graph.png")
    assert rendered.error is None, rendered.error
    missing = sorted(inserted - rendered.node_names)
    assert not missing, f"{len(missing)} inserted nodes not drawn, e.g. {missing[:3]}"
    assert (tmp_path / "graph.png").stat().st_size > 10_000


@pytest.mark.browser
@needs_chromium
def test_a_netron_error_is_detected(served, tmp_path):
    """The check above can fail: Netron's own error box on a file it cannot read is reported."""
    import netron

    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x08\x07\x12\x00garbage that is not an ONNX protobuf" * 8)
    host, port = netron.serve(str(bogus), None, address=("127.0.0.1", 0), browse=False)
    try:
        rendered = render(f"http://{host}:{port}/", timeout_s=60)
    finally:
        netron.stop((host, port))
    assert rendered.error is not None and not rendered.node_names


def test_view_command_serves_until_interrupted(tmp_path):
    from qcompiler.models import DIGITS_VIT

    process = subprocess.Popen([sys.executable, "-m", "qcompiler.cli.main", "view", str(DIGITS_VIT), "--no-browser"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"Netron" in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, err


def test_view_bad_input(tmp_path, capsys):
    bogus = tmp_path / "notes.onnx"
    bogus.write_text("not a model")
    assert main(["view", str(bogus), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcompile: error:") and "notes.onnx" in err and len(err.splitlines()) == 1


def test_view_port_in_use(capsys):
    import socket

    from qcompiler.models import DIGITS_VIT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", str(DIGITS_VIT), "--no-browser", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"port {port}" in err and "in use" in err and len(err.splitlines()) == 1
