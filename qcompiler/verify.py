"""Numerical checks shared by passes, tests and the CLI: seeded random inputs and ORT comparisons."""

from __future__ import annotations

import numpy as np
import onnx

from qcompiler.calibration.readers import CalibrationBatch

#: Integer inputs (token ids, timesteps) are drawn from [0, INT_INPUT_HIGH): valid for any vocabulary.
INT_INPUT_HIGH = 100


def _concrete_shape(value_info: onnx.ValueInfoProto, batch: int) -> list[int]:
    dims = value_info.type.tensor_type.shape.dim
    shape = []
    for index, dim in enumerate(dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        else:
            shape.append(batch if index == 0 else 8)
    return shape


def random_batches(model: onnx.ModelProto, count: int = 2, seed: int = 0, batch: int = 2) -> list[CalibrationBatch]:
    """Seeded random feeds for the model's inputs: N(0, 1) floats, ints in [0, 100), masks of ones."""
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    batches = []
    for index in range(count):
        feeds = {}
        for value_info in model.graph.input:
            if value_info.name in initializers:
                continue
            shape = _concrete_shape(value_info, batch)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[value_info.name] = rng.standard_normal(shape).astype(dtype)
            elif "mask" in value_info.name:
                feeds[value_info.name] = np.ones(shape, dtype=dtype)
            elif "type" in value_info.name:
                feeds[value_info.name] = np.zeros(shape, dtype=dtype)
            else:
                feeds[value_info.name] = rng.integers(0, INT_INPUT_HIGH, size=shape).astype(dtype)
        batches.append(CalibrationBatch(feeds=feeds, metadata={}, source=f"random(seed={seed}, #{index})"))
    return batches


def max_relative_error(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
    """max over outputs of max|a − b| / max|a| (the 1e-5 criterion for equivalence rewrites)."""
    worst = 0.0
    for name, value in reference.items():
        scale = float(np.max(np.abs(value))) + 1e-30
        worst = max(worst, float(np.max(np.abs(candidate[name] - value))) / scale)
    return worst


def compare_models(model_a, model_b, batches) -> float:
    """Run two models on the same feeds in ORT and return the worst relative output difference."""
    from qcompiler.runtimes.ort import make_session, run

    session_a, session_b = make_session(model_a), make_session(model_b)
    return max(max_relative_error(run(session_a, b.feeds), run(session_b, b.feeds)) for b in batches)
