"""Shared helpers for pass tests: a context with seeded calibration, and running a model in ORT."""

import numpy as np

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.runtimes.ort import make_session


def batches_for(model, shapes: dict[str, tuple], count: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [CalibrationBatch(feeds={name: rng.standard_normal(shape).astype(np.float32)
                                    for name, shape in shapes.items()}, metadata={}, source=f"seed{seed}#{i}")
            for i in range(count)]


def context(model, shapes, wbits=8, abits=8, count=4):
    return CompileContext(model, QuantSettings(wbits=wbits, abits=abits), batches_for(model, shapes, count))


def run_model(model, feeds, optimize=True):
    session = make_session(model, optimize=optimize)
    return session.run(None, feeds)[0]
