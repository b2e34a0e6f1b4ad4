"""dgq_groups per_timestep: group ranges per calibrated timestep, looked up from the model's timestep input."""

import numpy as np
import pytest
from onnx import TensorProto, helper
from qcompiler.passes import (
    DgqGroups,
    InsertActivationQDQ,
    QuantizeWeights,
)
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.lowering.timestep_integer import INTEGER
from qcompiler.lowering.timestep_ranges import LOWERING, split_by_timestep
from qcompiler.targets.ort import OrtTarget, OrtTargetConfig

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.quant import QuantSpec, dequantize, quantize
from tests import graphs
from tests.passes.helpers import run_model

K, N = 16, 8
TIMESTEPS = (1.0, 500.0, 961.0)


def timestep_model(seed: int = 0):
    """h = x·(1 + t/100) (the range grows with t), y = h·W + b: a denoiser-shaped toy."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Div", ["timestep", "hundred"], ["t_scaled"]),
             helper.make_node("Add", ["t_scaled", "one"], ["gain"]),
             helper.make_node("Unsqueeze", ["gain", "axes"], ["gain3"]),
             helper.make_node("Mul", ["x", "gain3"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["hw"], name="linear"),
             helper.make_node("Add", ["hw", "b"], ["y"], name="linear_bias")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, K]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, N])
    inits = [graphs.init("hundred", np.array(100.0, np.float32)), graphs.init("one", np.array(1.0, np.float32)),
             graphs.init("axes", np.array([1, 2], np.int64)),
             graphs.init("w", rng.standard_normal((K, N)).astype(np.float32)),
             graphs.init("b", rng.standard_normal(N).astype(np.float32))]
    return graphs.make_model(nodes, inputs, [output], inits)


def batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(TIMESTEPS):
        x = rng.standard_normal((3, 4, K)).astype(np.float32)
        x[..., 5] *= 6.0  # a wide channel, so the groups differ
        out.append(CalibrationBatch({"x": x, "timestep": np.full(3, t, np.float32)},
                                    {"__timestep__": np.full(3, int(t))}, f"t{i}"))
    return out


def lowered(per_timestep: bool, mode: str = "integer"):
    data = batches()
    ctx = CompileContext(timestep_model(), QuantSettings(), data)
    QuantizeWeights().call(ctx)
    DgqGroups(DgqGroupsConfig(groups=4, per_timestep=per_timestep)).call(ctx)
    InsertActivationQDQ().call(ctx)
    OrtTarget(OrtTargetConfig(timestep_groups=mode)).lower(ctx)
    return ctx, ctx.group_plans["h"], data


def test_split_by_timestep_regroups_mixed_rows():
    mixed = CalibrationBatch({"x": np.arange(4.0)[:, None], "timestep": np.array([5.0, 1, 5, 1], np.float32)},
                             {}, "mixed")
    parts = split_by_timestep([mixed], "timestep")
    assert list(parts) == [1.0, 5.0]
    np.testing.assert_array_equal(parts[5.0][0].feeds["x"][:, 0], [0.0, 2.0])


@pytest.mark.parametrize("mode", ["integer", "simulate"])
@pytest.mark.parametrize("t_index", range(len(TIMESTEPS)))
def test_each_timestep_uses_its_own_group_ranges(t_index, mode):
    ctx, plan, data = lowered(per_timestep=True, mode=mode)
    assert plan.timesteps.tolist() == list(TIMESTEPS)
    label = f"{INTEGER} (per-timestep)" if mode == "integer" else LOWERING
    assert {r.lowering for r in ctx.records if r.pass_name == "ort"} == {label}
    batch = data[t_index]
    got = run_model(ctx.model(), batch.feeds)
    # Reference: h quantized with the t-th row of (S, Z) per channel, times the int8-dequantized W.
    h = batch.feeds["x"] * np.float32(1 + TIMESTEPS[t_index] / 100)
    spec = QuantSpec(bits=8, symmetric=False)
    scale = plan.timestep_scales[t_index][plan.labels]
    zero_point = plan.timestep_zero_points[t_index][plan.labels].astype(np.int32)
    h_hat = dequantize(quantize(h, scale, zero_point, spec, axis=-1), scale, zero_point, axis=-1)
    initial = {i.name: i for i in timestep_model().graph.initializer}
    from onnx import numpy_helper

    from qcompiler.quant import fake_quantize
    w_hat = fake_quantize(numpy_helper.to_array(initial["w"]), QuantSpec(bits=8, symmetric=True,
                                                                          granularity="axis", axis=1))
    expected = h_hat @ w_hat + numpy_helper.to_array(initial["b"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Bound inside the range calibrated at t: |h − ĥ| ≤ s_g(t)/2.
    assert np.all(np.abs(h - h_hat) <= scale / 2 + 1e-6)


def test_per_timestep_ranges_beat_one_range_at_the_small_timestep():
    errors = {}
    for per_timestep in (False, True):
        ctx, _, data = lowered(per_timestep)
        reference = run_model(timestep_model(), data[0].feeds)
        errors[per_timestep] = np.abs(run_model(ctx.model(), data[0].feeds) - reference).mean()
    assert errors[True] < errors[False] / 3  # t = 1's range is ~1/10.6 of t = 961's


def test_model_without_the_timestep_input_is_a_clear_error():
    x = np.random.default_rng(0).standard_normal((2, 4, K)).astype(np.float32)
    ctx = CompileContext(graphs.linear_model(k=K, n=N), QuantSettings(), [CalibrationBatch({"x": x}, {}, "b0")])
    with pytest.raises(PassError, match="needs the model input 'timestep'"):
        DgqGroups(DgqGroupsConfig(per_timestep=True)).requires(ctx)
