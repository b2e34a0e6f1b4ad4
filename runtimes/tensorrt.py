"""TensorRT engines: build one from an ONNX model, run it and time it (where ``tensorrt`` imports).

The TensorRT target's output carries its precision in the graph (Q/DQ, int4 blocked DQ), so its
engine is built **strongly typed** (TensorRT takes each layer's type from the graph, no precision
flags; ``trtexec --stronglyTyped``). The FP16 baseline of a float model is built weakly typed with
the FP16 flag. Polygraphy (NVIDIA's TensorRT toolkit) drives the build and the CUDA buffers; both it
and TensorRT are imported only when an engine is asked for, so a machine without them gets one
clear line (``unavailable()``), never an ImportError. Install: ``pip install -e ".[tensorrt]"`` on a
machine with an NVIDIA GPU.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from qcompiler.errors import QCompileError


def unavailable() -> str | None:
    """Why TensorRT engines cannot be built here (one line), or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA library the wheel cannot load
        return (f"TensorRT is not available here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "it needs an NVIDIA GPU and `pip install -e \".[tensorrt]\"`")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "Polygraphy is not installed; `pip install -e \".[tensorrt]\"` installs it with TensorRT"
    return None


@dataclass(frozen=True)
class EngineOptions:
    #: Take every layer's precision from the graph (the TensorRT target's output); False + ``fp16``
    #: for the FP16 baseline of a float model.
    strongly_typed: bool = True
    fp16: bool = False
    #: Input shapes of the optimization profile (min = opt = max), by input name; required for
    #: inputs with symbolic dimensions.
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class Timing:
    median_ms: float
    runs: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "runs": self.runs}


class Engine:
    """A built TensorRT engine with its runner: ``run(feeds)`` and ``time(feeds)``."""

    def __init__(self, model_path: str | os.PathLike, options: EngineOptions = EngineOptions()):
        reason = unavailable()
        if reason:
            raise QCompileError(reason)
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromNetwork,
            NetworkFromOnnxPath,
            Profile,
            TrtRunner,
        )

        profiles = []
        if options.shapes:
            profile = Profile()
            for name, shape in options.shapes.items():
                profile.add(name, min=shape, opt=shape, max=shape)
            profiles = [profile]
        network = NetworkFromOnnxPath(str(model_path), strongly_typed=options.strongly_typed or None)
        config = CreateConfig(fp16=options.fp16 and not options.strongly_typed, profiles=profiles or None)
        started = time.perf_counter()
        try:
            self._runner = TrtRunner(EngineFromNetwork(network, config=config))
            self._runner.activate()
        except Exception as exc:  # noqa: BLE001 - the parser/builder raise through Polygraphy's logger
            raise QCompileError(f"{model_path}: TensorRT could not build an engine: "
                                f"{str(exc).splitlines()[0][:300]}") from None
        self.build_seconds = time.perf_counter() - started

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._runner.infer(feed_dict=feeds, copy_outputs_to_host=True)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def time(self, feeds: dict[str, np.ndarray], warmup: int = 10, runs: int = 50) -> Timing:
        """Median latency of ``runs`` synchronous inferences (host to host) after ``warmup``."""
        for _ in range(warmup):
            self._runner.infer(feed_dict=feeds)
        samples = []
        for _ in range(runs):
            self._runner.infer(feed_dict=feeds)
            samples.append(self._runner.last_inference_time() * 1e3)
        return Timing(statistics.median(samples), runs)

    def close(self) -> None:
        self._runner.deactivate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
