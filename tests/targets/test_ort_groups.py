"""The ORT target's DGQ group lowerings (split, fold, rows, simulate): each equals the numpy fake-quant reference and runs the kernels it claims."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.passes import DgqGroups, InsertActivationQDQ, QuantizeWeights
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.lowering.channel_groups import fold_parameters
from qcompiler.targets.ort import OrtTarget, OrtTargetConfig
from qcompiler.targets.ort_groups import FOLD, ROWS, SIMULATED, SPLIT
from qcompiler.lowering.matmul_nbits import dequantize_matmul_nbits, quantize_int4_blocks
from qcompiler.quant import QuantSpec, fake_quantize
from qcompiler.runtimes.ort import count_kernels
from tests import graphs
from tests.passes.helpers import run_model
from tests.passes.test_dgq_groups import channel_outliers, feeds, token_outliers

#: Both sides compute the same sums of the same products; they differ by float32 summation order
#: and by where s[t]·s_w[n] is rounded: a few ulp of the largest partial sum, far below 1e-5 of it.
RTOL = 1e-5


def lower(model, arrays, name="x", groups=DgqGroupsConfig(validate=False), mode="split", wbits=8, abits=8,
          weights=QuantizeWeights.Config()):
    """The dgq recipe's passes on ``model`` (weights, groups, leftover per-tensor QDQ), then the ORT target."""
    batches = [CalibrationBatch({name: x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    ctx = CompileContext(model, QuantSettings(wbits=wbits, abits=abits), batches)
    QuantizeWeights(weights).call(ctx)
    DgqGroups(groups).call(ctx)
    InsertActivationQDQ().call(ctx)  # must leave the planned tensors to the target
    assert OrtTarget(OrtTargetConfig(channel_groups=mode)).lower(ctx).modified
    return ctx, ctx.group_plans[name]


def initializers(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def int8_weight(weight, axis):
    return fake_quantize(weight, QuantSpec(bits=8, symmetric=True, granularity="axis", axis=axis))


def kernels(ctx, tmp_path):
    path = tmp_path / "lowered.onnx"
    onnx.save(ctx.model(), path)
    return count_kernels(path)


def assert_close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * float(np.max(np.abs(expected))))


def lowerings(ctx):
    return [r.lowering for r in group_records(ctx)]


def group_records(ctx):
    """The target's records of DGQ plans (it also records the Conv outputs it quantizes)."""
    return [r for r in ctx.records if r.pass_name == "ort" and "group_axis" in r.details]


@pytest.mark.parametrize("abits", [8, 6])
def test_token_groups_lower_to_one_integer_gemm_with_row_scales(tmp_path, abits):
    model = graphs.linear_model(k=16, n=8)
    ctx, plan = lower(model, feeds((2, 4, 16), outlier=token_outliers), abits=abits)
    assert plan.axis == "pixel" and lowerings(ctx) == [ROWS]
    x = feeds((3, 4, 16), seed=7, count=1, outlier=token_outliers)[0] * 1.5  # 1.5: some values clip
    spec = QuantSpec(bits=abits, granularity="groups", axis=1)
    weights = initializers(model)
    expected = np.maximum(fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels)
                          @ int8_weight(weights["W"], 1) + weights["b"], 0)
    assert_close(run_model(ctx.model(), {"x": x}), expected)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 1 and found.float_gemms == 0


def test_channel_groups_split_into_k_integer_gemms(tmp_path):
    model = graphs.linear_model(k=16, n=8)
    ctx, plan = lower(model, feeds((2, 4, 16), outlier=channel_outliers), groups=DgqGroupsConfig(groups=4, validate=False))
    assert plan.axis == "channel" and plan.groups == 4 and lowerings(ctx) == [SPLIT]
    x = feeds((3, 4, 16), seed=7, count=1, outlier=channel_outliers)[0] * 1.5
    spec = QuantSpec(bits=8, granularity="groups", axis=-1)
    weights = initializers(model)
    expected = np.maximum(fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels)
                          @ int8_weight(weights["W"], 1) + weights["b"], 0)
    assert_close(run_model(ctx.model(), {"x": x}), expected)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 4 and found.float_gemms == 0  # one per group


def test_fold_matches_its_reference_in_one_integer_gemm(tmp_path):
    model = graphs.linear_model(k=16, n=8)
    arrays = feeds((2, 4, 16), outlier=channel_outliers)
    groups = DgqGroupsConfig(groups=4, validate=False)
    ctx, plan = lower(model, arrays, groups=groups, mode="fold")
    assert lowerings(ctx) == [FOLD]
    assert len(ctx.fallbacks) == 1 and "Div" in ctx.fallbacks[0]  # its one run-time elementwise op
    sigma, zero_point = fold_parameters(plan)
    rho = sigma[plan.labels] / sigma.max()
    weights = initializers(model)
    spec = QuantSpec(bits=8, symmetric=True, granularity="axis", axis=1)
    folded = fake_quantize(int8_weight(weights["W"], 1) * rho[:, None], spec)
    x = feeds((3, 4, 16), seed=7, count=1, outlier=channel_outliers)[0]
    x_hat = fake_quantize(x, QuantSpec(bits=8, granularity="groups", axis=-1), sigma,
                          np.full(plan.groups, zero_point, np.uint8), plan.labels)
    # The graph computes s_ref·(q − z)·Ŵ' = σ_g·(q − z)·(Ŵ'/ρ): the same sums, grouped differently.
    expected = np.maximum(x_hat @ (folded / rho[:, None]) + weights["b"], 0)
    got = run_model(ctx.model(), {"x": x})
    assert_close(got, expected)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 1 and found.float_gemms == 0
    split, _ = lower(model, arrays, groups=groups)
    # Fold trades accuracy for one GEMM (σ_g ≥ s_g, Ŵ·ρ rounded twice): it differs from the exact
    # split by more than float rounding. How much, on real models: benchmarks/bench_dgq.py.
    difference = np.abs(got - run_model(split.model(), {"x": x}))
    assert difference.max() > RTOL * np.abs(expected).max()


@pytest.mark.parametrize("groups", [3, 1])  # K = 1: one partial GEMM, still no MatMul → Add for ORT to turn into Gemm
def test_gemm_channel_split_folds_alpha_and_adds_the_bias(tmp_path, groups):
    model = graphs.gemm_model(k=16, n=8, trans_b=1, alpha=0.5)
    ctx, plan = lower(model, feeds((4, 16), outlier=channel_outliers), groups=DgqGroupsConfig(groups=groups, validate=False))
    assert lowerings(ctx) == [SPLIT]
    x = feeds((5, 16), seed=2, count=1, outlier=channel_outliers)[0]
    weights = initializers(model)
    x_hat = fake_quantize(x, QuantSpec(bits=8, granularity="groups", axis=-1), plan.scales, plan.zero_points,
                          plan.labels)
    expected = 0.5 * x_hat @ int8_weight(weights["W"], 0).T + weights["b"]
    assert_close(run_model(ctx.model(), {"x": x}), expected)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == groups and found.float_gemms == 0


def test_gemm_fold_runs_one_integer_gemm(tmp_path):
    model = graphs.gemm_model(k=16, n=8, trans_b=1)
    ctx, _ = lower(model, feeds((4, 16), outlier=channel_outliers), groups=DgqGroupsConfig(groups=3, validate=False),
                   mode="fold")
    assert lowerings(ctx) == [FOLD]
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 1 and found.float_gemms == 0


def single_conv(c_in=4, c_out=8, weight=None, bias=None):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32) * 0.3 if weight is None else weight
    bias = rng.standard_normal(c_out).astype(np.float32) if bias is None else bias
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    return graphs.make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c_in, 6, 6])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c_out, 6, 6])],
                             [graphs.init("w", weight), graphs.init("b", bias)])


def float_conv(model, x_hat):
    """The reference: the float Conv on fake-quantized input and weight."""
    weights = initializers(model)
    return run_model(single_conv(weight=int8_weight(weights["w"], 0), bias=weights["b"]), {"x": x_hat})


def with_output_grid(ctx, name, expected):
    """``expected`` on the Conv output grid the pass recorded (every lowering applies it; in the split
    and simulated forms it is a simulated Q/DQ), and the tolerance: one step of that grid, since
    float sums in another order may cross a rounding boundary."""
    grid = ctx.output_grids[name]
    assert any(r.tensor == name and r.lowering == "simulated (Conv output grid of the deployed form)"
               for r in ctx.records)
    return fake_quantize(expected, grid.spec, grid.scale, grid.zero_point), grid.scale


def test_conv_channel_groups_split_into_conv_integer(tmp_path):
    model = single_conv()

    def outliers(x):
        x[:, 1] *= 30.0

    ctx, plan = lower(model, feeds((2, 4, 6, 6), outlier=outliers), groups=DgqGroupsConfig(groups=2, validate=False))
    assert plan.axis == "channel" and plan.groups == 2 and lowerings(ctx) == [SPLIT]
    x = feeds((2, 4, 6, 6), seed=5, count=1, outlier=outliers)[0]
    x_hat = fake_quantize(x, QuantSpec(bits=8, granularity="groups", axis=1), plan.scales, plan.zero_points,
                          plan.labels)
    # pads=1: ConvInteger pads with each group's zero point, i.e. with the real value 0 like Conv.
    expected, step = with_output_grid(ctx, "y", float_conv(model, x_hat))
    np.testing.assert_allclose(run_model(ctx.model(), {"x": x}), expected, rtol=0, atol=step * 1.001)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("ConvInteger") == 2 and found.float_gemms == 0


def test_conv_pixel_groups_are_simulated(tmp_path):
    model = single_conv()

    def outliers(x):
        x[:, :, 2, 3] *= 40.0

    ctx, plan = lower(model, feeds((2, 4, 6, 6), outlier=outliers), groups=DgqGroupsConfig(validate=False, conv_axis="auto"))
    assert plan.axis == "pixel" and lowerings(ctx) == [SIMULATED]
    x = feeds((2, 4, 6, 6), seed=5, count=1, outlier=outliers)[0]
    flat = fake_quantize(x.reshape(2, 4, 36), QuantSpec(bits=8, granularity="groups", axis=2), plan.scales,
                         plan.zero_points, plan.labels)
    expected, step = with_output_grid(ctx, "y", float_conv(model, flat.reshape(x.shape)))
    np.testing.assert_allclose(run_model(ctx.model(), {"x": x}), expected, rtol=0, atol=step * 1.001)
    found = kernels(ctx, tmp_path)
    assert found.integer_gemms == 0 and found.float_gemms == 1


def test_pixel_groups_over_two_axes_of_a_linear_input_are_simulated(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    model = graphs.make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, 3, 8])],
                              [graphs.init("W", weight)])

    def outliers(x):
        x[:, 1, 2, :] = x[:, 1, 2, :] * 4.0 + 30.0

    ctx, plan = lower(model, feeds((2, 2, 3, 16), outlier=outliers))
    assert plan.axis == "pixel" and plan.labels.shape == (6,) and lowerings(ctx) == [SIMULATED]
    x = feeds((2, 2, 3, 16), seed=4, count=1, outlier=outliers)[0]
    flat = fake_quantize(x.reshape(2, 6, 16), QuantSpec(bits=8, granularity="groups", axis=1), plan.scales,
                         plan.zero_points, plan.labels)
    assert_close(run_model(ctx.model(), {"x": x}), flat.reshape(x.shape) @ int8_weight(weight, 1))
    assert kernels(ctx, tmp_path).float_gemms == 1  # a (B, H, W, C) input has no per-row integer GEMM


def test_int4_token_groups_scale_the_rows_of_matmul_nbits(tmp_path):
    model = graphs.linear_model(k=64, n=8)
    ctx, plan = lower(model, feeds((2, 4, 64), outlier=token_outliers), wbits=4,
                      weights=QuantizeWeights.Config(nbits_accuracy_level=0))  # 0: float compute, exact
    record = group_records(ctx)[0]
    assert record.lowering == ROWS and record.details["kernel"] == "MatMulNBits"
    x = feeds((3, 4, 64), seed=7, count=1, outlier=token_outliers)[0]
    weights = initializers(model)
    w_hat = dequantize_matmul_nbits(*quantize_int4_blocks(weights["W"], 32), 32)
    x_hat = fake_quantize(x, QuantSpec(bits=8, granularity="groups", axis=1), plan.scales, plan.zero_points,
                          plan.labels)
    assert_close(run_model(ctx.model(), {"x": x}), np.maximum(x_hat @ w_hat + weights["b"], 0))
    assert kernels(ctx, tmp_path).op_types.get("MatMulNBits") == 1


def test_records_carry_the_axis_choice():
    ctx, plan = lower(graphs.linear_model(k=16, n=8), feeds((2, 4, 16), outlier=channel_outliers))
    record = group_records(ctx)[0]
    assert record.details["d_star"] == "channel" and record.details["D_channel"] == plan.d_channel
    assert record.details["groups"] == plan.groups and record.role == "activation"


def test_config_rejects_unknown_channel_lowering():
    with pytest.raises(ValueError, match="affine"):
        OrtTargetConfig("merge")


def test_no_plans_means_no_change():
    batches = [CalibrationBatch({"x": x}, {}, "t") for x in feeds((2, 4, 8))]
    ctx = CompileContext(graphs.layernorm_model(), QuantSettings(), batches)
    DgqGroups().call(ctx)
    assert ctx.group_plans == {}
    assert not OrtTarget().lower(ctx).modified
