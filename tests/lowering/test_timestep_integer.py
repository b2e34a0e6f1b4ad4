"""Per-timestep / TDQ tables on integer kernels: the integer form equals the simulated one at every row's timestep."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.grids import GroupPlan
from qcompiler.lowering.channel_groups import dequantized_weight
from qcompiler.lowering.timestep_integer import INTEGER
from qcompiler.lowering.timestep_ranges import LOWERING
from qcompiler.passes import QuantizeWeights
from qcompiler.quant import QuantSpec, scale_zero_point
from qcompiler.runtimes.ort import count_kernels
from qcompiler.targets.ort import OrtTarget, OrtTargetConfig
from tests import graphs
from tests.passes.helpers import run_model

C, N, TOKENS = 12, 8, 4
TIMESTEPS = np.array([1.0, 400.0, 961.0])
#: Both forms compute the same codes and the same products; they differ by float32 rounding of the
#: rescaling (s·(P − z·D) against Σ (q − z)·s·Ŵ), a few ulp of the output's largest value.
RTOL = 1e-5


def linear_model(bias_as_gemm: bool = False, channels: int = C, outputs: int = N, tokens: int = TOKENS,
                 alpha: float = 1.0, beta: float = 1.0):
    """x (B, T, C) → MatMul(W) + b, or x (B, C) → Gemm(W, b, transB=1); timestep (B,) is only gathered by."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, outputs)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32)
    if bias_as_gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=alpha, beta=beta)]
        x_shape, y_shape, w = ["B", channels], ["B", outputs], w.T.copy()
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])]
        x_shape, y_shape = ["B", tokens, channels], ["B", tokens, outputs]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])]
    return graphs.make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                             [graphs.init("w", w), graphs.init("b", b)])


def conv_model(group: int = 1, channels: int = C, dilated: bool = False):
    """x (B, C, 6, 6) read by a padded, strided 3×3 Conv with bias and a 1×1 Conv (``group``): two paddings.
    ``dilated``: the 3×3 Conv has dilation 2 and asymmetric pads (2, 1, 2, 3) instead (same 3×3 output)."""
    rng = np.random.default_rng(1)
    first = ({"pads": [2, 1, 2, 3], "strides": [2, 2], "dilations": [2, 2]} if dilated
             else {"pads": [1, 1, 1, 1], "strides": [2, 2]})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv3", **first),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv1", group=group),
             helper.make_node("GlobalAveragePool", ["c2"], ["p2"]), helper.make_node("Add", ["c1", "p2"], ["y"])]
    inits = [graphs.init("w1", rng.standard_normal((N, channels, 3, 3)).astype(np.float32)),
             graphs.init("b1", rng.standard_normal(N).astype(np.float32)),
             graphs.init("w2", rng.standard_normal((N, channels // group, 1, 1)).astype(np.float32))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, 6, 6]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])]
    return graphs.make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N, 3, 3])],
                             inits)


def timestep_plan(axis: str, labels: np.ndarray, channel_axis: int, timesteps=TIMESTEPS, bits: int = 8, seed: int = 0):
    """A plan with a random range per (timestep, group) that grows with t, as diffusion activations do."""
    rng = np.random.default_rng(seed)
    groups = int(labels.max()) + 1
    gain = 1.0 + timesteps[:, None] / 300.0
    low = -rng.uniform(0.5, 3.0, (timesteps.size, groups)) * gain
    high = rng.uniform(0.5, 3.0, (timesteps.size, groups)) * gain
    spec = QuantSpec(bits=bits, symmetric=False)
    scales, zeros = scale_zero_point(low, high, spec)
    static_scale, static_zero = scale_zero_point(low.min(axis=0), high.max(axis=0), spec)
    return GroupPlan("x", axis, channel_axis, labels, static_scale, static_zero, low.min(axis=0), high.max(axis=0),
                     bits, 1.0, 0.5, timesteps=np.asarray(timesteps, np.float64),
                     timestep_scales=scales.astype(np.float32), timestep_zero_points=zeros.astype(np.float32))


def lowered(model, plan: GroupPlan, mode: str, abits: int = 8):
    x_shape = [d if isinstance(d, int) else 2 for d in
               (d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim)]
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    batch = CalibrationBatch({"x": x, "timestep": np.array([1.0, 961.0], np.float32)}, {}, "calib")
    ctx = CompileContext(model, QuantSettings(abits=abits), [batch])
    QuantizeWeights().call(ctx)
    ctx.group_plans = {"x": plan}
    OrtTarget(OrtTargetConfig(timestep_groups=mode)).lower(ctx)
    return ctx


def mixed_feeds(model, seed: int = 3, timesteps=(961.0, 1.0, 400.0, 700.0)):
    """One row per timestep, mixed in one batch (700 is not calibrated: its nearest row is 961's)."""
    dims = [d.dim_value or len(timesteps) for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32) * 4.0
    return {"x": x, "timestep": np.array(timesteps, np.float32)}


def assert_forms_agree(model, plan, abits: int = 8):
    integer, simulated = lowered(model, plan, "integer", abits), lowered(model, plan, "simulate", abits)
    feeds = mixed_feeds(model)
    got, expected = run_model(integer.model(), feeds), run_model(simulated.model(), feeds)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    return integer, simulated


@pytest.mark.parametrize("groups", [1, 3])
def test_linear_channel_groups_run_integer_and_equal_the_simulated_form(groups, tmp_path):
    labels = np.arange(C) % groups
    integer, simulated = assert_forms_agree(linear_model(), timestep_plan("channel", labels, -1))
    assert {r.lowering for r in integer.records if r.pass_name == "ort"} == {f"{INTEGER} (per-timestep)"}
    assert {r.lowering for r in simulated.records if r.pass_name == "ort"} == {LOWERING}
    path = tmp_path / "integer.onnx"
    path.write_bytes(integer.model().SerializeToString())
    counts = count_kernels(path)
    assert counts.integer_gemms == groups and counts.float_gemms == 0, counts.op_types


def test_linear_rows_below_8_bits_equal_the_simulated_form():
    assert_forms_agree(linear_model(), timestep_plan("channel", np.arange(C) % 2, -1, bits=6), abits=6)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm_bias_is_kept(alpha, beta):
    assert_forms_agree(linear_model(bias_as_gemm=True, alpha=alpha, beta=beta),
                       timestep_plan("channel", np.arange(C) % 2, -1))


def test_dilated_conv_with_asymmetric_pads():
    assert_forms_agree(conv_model(dilated=True), timestep_plan("channel", np.arange(C) % 2, 1))


@pytest.mark.parametrize("case", ["conv groups", "tokens", "linear one group"])
@pytest.mark.parametrize("mode", ["integer", "simulate"])
def test_one_timestep_for_the_whole_batch(case, mode):
    """timestep of shape (1,) with a batch of 4: every row takes that timestep's parameters."""
    model, plan = {"conv groups": (conv_model(), timestep_plan("channel", np.arange(C) % 3, 1)),
                   "tokens": (linear_model(), timestep_plan("pixel", np.array([0, 1, 1, 0]), -1)),
                   "linear one group": (linear_model(), timestep_plan("channel", np.zeros(C, int), -1))}[case]
    feeds = mixed_feeds(model, timesteps=(400.0,) * 4)
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "one"  # not x's batch "B"
    got = run_model(lowered(model, plan, mode).model(), {**feeds, "timestep": np.array([400.0], np.float32)})
    expected = run_model(lowered(model, plan, "simulate").model(), feeds)  # one timestep per row, spelled out
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_an_empty_group_is_simulated_not_miscomputed():
    labels = np.arange(C) % 3 * 2 % 4  # labels 0 and 2: of the plan's 3 groups, group 1 is empty
    plan = timestep_plan("channel", labels, -1)
    integer, _ = assert_forms_agree(linear_model(), plan)
    record = next(r for r in integer.records if r.pass_name == "ort")
    assert record.lowering == LOWERING and "empty group" in record.details["reason"]


@pytest.mark.parametrize("case", ["conv one group", "conv groups", "tokens"])
def test_the_q_dq_simulated_form_equals_the_numpy_reference(case):
    """The per-axis Q/DQ on a flattened view (one group, or groups on axis 1) against fake quantization in numpy."""
    model, plan = {"conv one group": (conv_model(), timestep_plan("channel", np.zeros(C, int), 1, bits=6)),
                   "conv groups": (conv_model(), timestep_plan("channel", np.arange(C) % 3, 1)),
                   "tokens": (linear_model(), timestep_plan("pixel", np.array([0, 1, 1, 0]), -1))}[case]
    ctx = lowered(model, plan, "simulate", abits=plan.bits)
    x_hat = next(n for n in ctx.graph.nodes if n.op in ("Conv", "MatMul")).inputs[0]
    ctx.graph.outputs = [x_hat]
    feeds = mixed_feeds(model)
    got = run_model(ctx.model(), feeds)
    rows = np.abs(feeds["timestep"][:, None] - TIMESTEPS[None, :]).argmin(axis=1)
    shape = (-1, C, 1, 1) if plan.channel_axis == 1 else (-1, TOKENS, 1)
    s = plan.timestep_scales[rows][:, plan.labels].reshape(shape)
    z = plan.timestep_zero_points[rows][:, plan.labels].reshape(shape)
    expected = (np.clip(np.rint(feeds["x"] / s) + z, 0, 2**plan.bits - 1) - z) * s
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())



def test_token_groups_scale_each_row():
    integer, _ = assert_forms_agree(linear_model(), timestep_plan("pixel", np.array([0, 1, 1, 0]), -1))
    record = next(r for r in integer.records if r.pass_name == "ort")
    assert record.details["kernel"] == "MatMulIntegerToFloat" and record.details["integer_gemms"] == 1


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_padding_quantizes_to_the_zero_point(groups, tmp_path):
    integer, _ = assert_forms_agree(conv_model(), timestep_plan("channel", np.arange(C) % groups, 1))
    path = tmp_path / "conv.onnx"
    path.write_bytes(integer.model().SerializeToString())
    assert count_kernels(path).op_types.get("ConvInteger") == 2 * groups


def test_grouped_conv_is_simulated_with_its_reason():
    integer, _ = assert_forms_agree(conv_model(group=2), timestep_plan("channel", np.arange(C) % 2, 1))
    records = {r.node: r for r in integer.records if r.pass_name == "ort"}
    assert records["conv3"].lowering.startswith(INTEGER)
    assert records["conv1"].lowering == LOWERING and "grouped" in records["conv1"].details["reason"]


def test_tdq_table_is_gathered_at_t_itself():
    """A table with a row per t in [0, T) (TDQ's): each batch row reads row t exactly, also unseen ones."""
    T = 50
    plan = timestep_plan("channel", np.arange(C) % 2, -1, timesteps=np.arange(T, dtype=np.float64))
    plan.timestep_method = "tdq"
    integer, _ = assert_forms_agree(linear_model(), plan)
    assert {r.lowering for r in integer.records if r.pass_name == "ort"} == {f"{INTEGER} (TDQ)"}
    feeds = mixed_feeds(linear_model(), timesteps=(7.0, 7.0, 33.0, 49.0))
    x, t = feeds["x"], feeds["timestep"].astype(int)
    got = run_model(integer.model(), feeds)
    # Reference: x quantized per row with its own table row, times Ŵ, plus b.
    ctx = CompileContext(linear_model(), QuantSettings(), [])
    QuantizeWeights().call(ctx)
    w_hat = dequantized_weight(next(n for n in ctx.graph.nodes if n.op == "MatMul"))
    s = plan.timestep_scales[t][:, plan.labels][:, None, :]
    z = plan.timestep_zero_points[t][:, plan.labels][:, None, :]
    x_hat = (np.clip(np.rint(x / s) + z, 0, 255) - z) * s
    bias = next(i for i in linear_model().graph.initializer if i.name == "b")
    from onnx import numpy_helper

    expected = x_hat @ w_hat + numpy_helper.to_array(bias)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@settings(max_examples=8, deadline=None)
@given(groups=st.integers(1, 4), seed=st.integers(0, 1000), bits=st.sampled_from([4, 6, 8]))
def test_forms_agree_for_any_grouping(groups, seed, bits):
    labels = np.random.default_rng(seed).integers(0, groups, C)
    labels[:groups] = np.arange(groups)  # every group has a member
    assert_forms_agree(linear_model(), timestep_plan("channel", labels, -1, bits=bits, seed=seed), abits=bits)


def test_auto_keeps_the_forms_that_are_slower_as_integer_simulated():
    """auto: MatMul/Gemm of K ≥ 96 input channels with one group or token groups go integer; narrower
    Linears, Convs and K > 1 channel groups do not (benchmarks/results/timestep_gemm_forms.md)."""
    wide = 128
    cases = [(linear_model(channels=wide), timestep_plan("channel", np.zeros(wide, int), -1), INTEGER),
             (linear_model(channels=wide), timestep_plan("pixel", np.array([0, 1, 1, 0]), -1), INTEGER),
             (linear_model(channels=wide), timestep_plan("channel", np.arange(wide) % 3, -1), "3 channel groups"),
             (conv_model(channels=wide), timestep_plan("channel", np.zeros(wide, int), 1), "ConvInteger"),
             (linear_model(), timestep_plan("channel", np.zeros(C, int), -1), f"K = {C} input channels")]
    for model, plan, expected in cases:
        records = [r for r in lowered(model, plan, "auto").records if r.pass_name == "ort"]
        if expected == INTEGER:
            assert records and all(r.lowering.startswith(INTEGER) for r in records)
        else:
            assert records and all(r.lowering == LOWERING and expected in r.details["reason"] for r in records), records
