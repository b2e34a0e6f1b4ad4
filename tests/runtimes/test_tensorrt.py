"""``runtimes.tensorrt``: one clear line without TensorRT; a strongly typed engine where it imports.

The engine test runs only on a machine with an NVIDIA GPU and ``tensorrt`` (none was available
while this was written): the TensorRT-target model of a small LayerNorm → Linear graph must build
strongly typed and agree with ONNX Runtime on CPU to within one activation step per output
(both compute the same int8 grids; GPU GEMMs sum in another order).
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qcompiler.errors import QCompileError
from qcompiler.runtimes import tensorrt as trt_runtime


def test_without_tensorrt_the_reason_is_one_line():
    reason = trt_runtime.unavailable()
    if reason is None:
        pytest.skip("tensorrt imports here")
    assert "\n" not in reason and "tensorrt" in reason.lower()
    with pytest.raises(QCompileError, match="TensorRT is not available"):
        trt_runtime.Engine("model.onnx")


def test_strongly_typed_engine_matches_onnx_runtime(tmp_path):
    if trt_runtime.unavailable():
        pytest.skip(trt_runtime.unavailable())
    from qcompiler.runtimes.ort import make_session
    from tests.targets.test_tensorrt_target import (
        TensorRTTarget,
        _compile,
        _ln_data,
        ln_linear_model,
    )

    ctx, _ = _compile(ln_linear_model(), _ln_data(), TensorRTTarget)
    path = tmp_path / "model.trt.onnx"
    onnx.save(ctx.model(), path)
    x = _ln_data(seed=3, count=1)[0]
    want = make_session(str(path), optimize=False).run(None, {"x": x})[0]
    with trt_runtime.Engine(path, trt_runtime.EngineOptions(shapes={"x": x.shape})) as engine:
        got = next(iter(engine.run({"x": x}).values()))
        assert engine.time({"x": x}, warmup=2, runs=5).median_ms > 0
    q = next(n for n in ctx.graph.nodes if n.op == "QuantizeLinear")
    step = float(np.reshape(q.inputs[1].values, -1)[0])
    w = next(n for n in ctx.graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant))
    w_hat = w.inputs[0].values.astype(np.float64) * w.inputs[1].values[None, :]
    assert np.all(np.abs(got - want) <= np.abs(w_hat).sum(axis=0) * step + 1e-3)
