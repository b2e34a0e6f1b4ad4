"""Serve a model in Netron on 127.0.0.1: ``qcompile view MODEL``.

Netron (PyPI ``netron``) draws the graph with every node's name and ``doc_string``: qcompile's
inserted nodes are named ``<tensor>/<pass>/<Op>`` and their doc strings say which pass made
them and why, so the page shows what a recipe rewrote. The model is checked as every qcompile
command checks it (readable ONNX, complete external data) before the server starts.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from pathlib import Path

from qcompiler.errors import QCompileError, require

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def _check_port(port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror})"
            raise QCompileError(f"port {port} on {HOST} {why}; choose another with --port") from None


def serve(model: str | Path, port: int | None = None, browse: bool = False) -> str:
    """Start Netron's server in this process (a background thread) on ``model``; returns its URL."""
    from qcompiler.graph import load_structure

    model = Path(model)
    load_structure(model)  # bad input: one line naming the file, before a server starts
    netron = require("netron", "qcompile view", extra="deploy")
    if port is not None:
        if not 0 < port < 65536:
            raise QCompileError(f"--port must be between 1 and 65535, got {port}")
        _check_port(port)
    logging.getLogger("netron").setLevel(logging.WARNING)  # its own progress lines would go to stderr
    host, bound = netron.serve(str(model), None, address=(HOST, port or 0), browse=browse)
    return f"http://{host}:{bound}/"


def _address(url: str) -> tuple[str, int]:
    return HOST, int(url.rstrip("/").rsplit(":", 1)[1])


def stop(url: str) -> None:
    import netron

    netron.stop(_address(url))


def wait(url: str) -> None:
    """Serve until Ctrl-C or SIGTERM (from the main thread), then stop the server.

    The handlers are set here because a process started in the background by a non-interactive
    shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    """
    import netron

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while netron.status(_address(url)):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop(url)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
