"""quantize_weights with gptq=True: lower output error than round-to-nearest on correlated inputs; Conv too."""

import numpy as np
import pytest

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.passes import QuantizeWeights
from tests import graphs
from tests.passes.helpers import run_model


def _correlated(shape, count, seed):
    """Batches whose last-axis (Linear) or channel (Conv) features are one low-rank mix plus noise."""
    features = shape[-1] if len(shape) == 3 else shape[1]
    mix = np.random.default_rng(100).standard_normal((4, features))   # the same mix for every seed
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(count):
        base = rng.standard_normal((*shape[:-1], 4) if len(shape) == 3 else (shape[0], *shape[2:], 4))
        x = base @ mix + 0.05 * rng.standard_normal((*base.shape[:-1], features))
        x = x if len(shape) == 3 else np.moveaxis(x, -1, 1)
        batches.append(CalibrationBatch({"x": x.astype(np.float32)}, {}, f"b{i}"))
    return batches


def _output_error(model, shape, gptq, wbits=4):
    calib = _correlated(shape, 4, seed=0)
    ctx = CompileContext(model, QuantSettings(wbits=wbits), calib)
    config = QuantizeWeights.Config(gptq=gptq, gptq_batches=4, gptq_max_bits=wbits, nbits_accuracy_level=0)
    QuantizeWeights(config).requires(ctx)
    QuantizeWeights(config).call(ctx)
    x = _correlated(shape, 1, seed=1)[0].feeds["x"]   # held out: the same mix, other draws
    reference = run_model(model, {"x": x})
    return float(np.sum((run_model(ctx.model(), {"x": x}, optimize=False) - reference) ** 2)), ctx


@pytest.mark.parametrize("wbits", [4, 8])
def test_gptq_lowers_matmul_output_error(wbits):
    model = graphs.linear_model(k=128, n=32, bias=False)
    rtn, _ = _output_error(model, (4, 4, 128), gptq=False, wbits=wbits)
    gptq, ctx = _output_error(model, (4, 4, 128), gptq=True, wbits=wbits)
    assert gptq < 0.7 * rtn
    assert "GPTQ" not in str(ctx.records[0].spec)  # same grid kind; only the rounding differs
    assert ctx.weight_rules and all(rule.source is None for rule in ctx.weight_rules.values())


def test_gptq_conv_per_output_channel():
    model = graphs.conv_model(c_in=8, c_out=8)
    rtn, _ = _output_error(model, (2, 8, 8, 8), gptq=False)
    gptq, ctx = _output_error(model, (2, 8, 8, 8), gptq=True)
    assert gptq < rtn
    assert [n.op_type for n in ctx.model().graph.node].count("DequantizeLinear") == 2


def test_gptq_needs_calibration():
    from qcompiler.errors import PassError

    ctx = CompileContext(graphs.linear_model(), QuantSettings(wbits=4), [])
    with pytest.raises(PassError, match="calib"):
        QuantizeWeights(QuantizeWeights.Config(gptq=True)).requires(ctx)
