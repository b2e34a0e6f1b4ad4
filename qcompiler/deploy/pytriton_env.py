"""Run a real Triton server on a ``qcompile deploy`` repository: PyTriton's environment and server process.

PyPI's ``nvidia-pytriton`` ships the ``tritonserver`` binary (Triton 2.51) with its Python
backend. The backend stub links Debian's ``libpython3.11`` (3.11.2); started from another
3.11 build (pyenv's 3.11.7) it loads that build's standard library and fails to initialise
(``'_thread.RLock' object has no attribute '_recursion_count'``). So the server runs in a venv
made from Debian's own ``/usr/bin/python3.11`` (apt packages ``python3.11`` and
``python3.11-venv``), with PyTriton, numpy and the same onnxruntime version as this process (so
served outputs equal direct ORT outputs bit for bit). The venv is built once per set of pins
and cached: ``$QCOMPILE_PYTRITON_ENV``, else ``$QCOMPILE_CACHE/pytriton-KEY``, else
``<tmp>/qcompile-pytriton-KEY``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qcompiler.errors import QCompileError

logger = logging.getLogger(__name__)

#: Debian's interpreter, the one the Triton Python backend stub was built against.
SYSTEM_PYTHON = Path(os.environ.get("QCOMPILE_PYTRITON_PYTHON", "/usr/bin/python3.11"))
PYTRITON = "nvidia-pytriton==0.7.0"  # ships tritonserver 2.51
NUMPY = "numpy==1.26.4"  # PyTriton 0.7 needs numpy < 2
SERVER_SCRIPT = Path(__file__).with_name("pytriton_server.py")
READY_MARK = ".qcompile-ready"
#: PyTriton waits 1 s for its backend's handshake (pytriton/proxy/communication.py), which an
#: overloaded machine can miss; the server is started again that many times in all.
STARTS = 3
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*:")


def requirements() -> list[str]:
    import onnxruntime

    return [PYTRITON, NUMPY, f"onnxruntime=={onnxruntime.__version__}"]


def env_dir() -> Path:
    if os.environ.get("QCOMPILE_PYTRITON_ENV"):
        return Path(os.environ["QCOMPILE_PYTRITON_ENV"])
    key = hashlib.sha256("\n".join([str(SYSTEM_PYTHON), *requirements()]).encode()).hexdigest()[:12]
    root = Path(os.environ["QCOMPILE_CACHE"]) if os.environ.get("QCOMPILE_CACHE") else Path(tempfile.gettempdir())
    return root / f"{'' if os.environ.get('QCOMPILE_CACHE') else 'qcompile-'}pytriton-{key}"


def ensure_env() -> Path:
    """The venv's python, building the venv on first use (about a minute; a lock serialises builders)."""
    if not SYSTEM_PYTHON.is_file():
        raise QCompileError(f"{SYSTEM_PYTHON} not found: the Triton server needs Debian's python3.11 "
                            "(apt-get install python3.11 python3.11-venv)")
    venv = env_dir()
    python = venv / "bin" / "python"
    if (venv / READY_MARK).is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARK).is_file():  # another process built it while we waited
            return python
        shutil.rmtree(venv, ignore_errors=True)
        logger.info("building the PyTriton environment in %s", venv)
        commands = [[str(SYSTEM_PYTHON), "-m", "venv", str(venv)],
                    [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements()],
                    [str(python), "-c", "import pytriton.triton, onnxruntime, tritonclient.grpc.model_config_pb2"]]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise QCompileError(f"building the PyTriton environment failed at '{' '.join(command[:4])}': {tail[0]}")
        (venv / READY_MARK).write_text("\n".join(requirements()) + "\n")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PyTritonServer:
    """``tritonserver`` serving one ``REPO/NAME`` folder on 127.0.0.1 (a context manager).

    ``url`` is ``127.0.0.1:PORT`` for ``tritonclient.http``. The server's own log goes to
    ``log_path``; a server that does not become ready within ``timeout`` seconds raises with
    the log's last line.
    """

    model_dir: Path
    log_path: Path
    timeout: float = 180.0

    def __enter__(self) -> PyTritonServer:
        python = ensure_env()
        for attempt in range(1, STARTS + 1):
            self.http_port = free_port()
            ports = [str(self.http_port), str(free_port()), str(free_port())]
            self._log = open(self.log_path, "w")
            self._process = subprocess.Popen(
                [str(python), "-P", str(SERVER_SCRIPT), str(self.model_dir), "--http-port", ports[0],
                 "--grpc-port", ports[1], "--metrics-port", ports[2]],
                stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
            failure = self._wait_ready()
            if failure is None:
                return self
            self.__exit__(None, None, None)
            logger.warning("Triton start %d of %d failed: %s", attempt, STARTS, failure)
        raise QCompileError(f"Triton did not become ready serving {self.model_dir} (see {self.log_path}): {failure}")

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _wait_ready(self) -> str | None:
        """None once the server prints READY; else the log's last error line."""
        ready = threading.Event()

        def watch():
            for line in self._process.stdout:
                if line.startswith("READY"):
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not ready.wait(0.5):
            if self._process.poll() is not None or time.monotonic() > deadline:
                lines = Path(self.log_path).read_text().splitlines()
                errors = [line.strip() for line in lines if EXCEPTION_LINE.match(line.strip())]
                return (errors or [line for line in lines if line.strip()] or ["no output"])[-1]
        return None

    def alive(self) -> bool:
        return self._process.poll() is None

    def __exit__(self, *exc) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, 9)  # the server's own process group (start_new_session)
                self._process.wait()
        self._log.close()


def main() -> int:
    """``python -m qcompiler.deploy.pytriton_env``: build (or find) the environment and print its python."""
    print(ensure_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
