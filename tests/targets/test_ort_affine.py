"""The ORT target's default DGQ lowering: channel groups as an exact affine under one per-tensor grid.

Checked on small graphs: the integer codes the lowered graph computes are DGQ's codes; the output
stays within the stated bound of DGQ's reference X̂·Ŵ (W' = diag(r)·W is quantized once, per output
channel, instead of W: |ΔY[.., n]| ≤ Σ_c |y_c|·s'_w[n]/2 + Σ_c |x̂_c|·s_w[n]/2, y = s·(q − z));
every GEMM runs as one integer kernel.
Match cases: a LayerNorm that absorbs the affine, a graph input (explicit Div + Add), a padded Conv
(Div + Add after a Pad), a tensor read by two GEMMs. No-match: an auto-padded Conv.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.graph import add_outputs, to_model
from qcompiler.passes import DgqGroups, InsertActivationQDQ, QuantizeWeights
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.quant import QuantSpec, fake_quantize, quantize, shared_zero_point
from qcompiler.runtimes.ort import count_kernels, make_session
from qcompiler.targets.ort import OrtTarget
from qcompiler.targets.ort_groups import AFFINE, SIMULATED
from tests import graphs
from tests.passes.test_dgq_groups import channel_outliers, feeds

#: Codes from a Div + Add or an absorbed affine equal DGQ's except where x/s_g lies within float
#: rounding of a .5 tie; on continuous random data that is far below this share, and never > 1 step.
TIE_SHARE = 1e-3


def ln_linear_model(c=16, n=8, readers=1):
    """x → LayerNorm(γ, β with outlier channels) → h → MatMul(W_i) + b_i → y_i, for ``readers`` GEMMs."""
    rng = np.random.default_rng(3)
    gamma = np.ones(c, np.float32)
    gamma[3], beta = 30.0, np.zeros(c, np.float32)
    beta[7] = 12.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1)]
    inits = [graphs.init("gamma", gamma), graphs.init("beta", beta)]
    outputs = []
    for i in range(readers):
        nodes += [helper.make_node("MatMul", ["h", f"W{i}"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"y{i}"], name=f"fc{i}_bias")]
        inits += [graphs.init(f"W{i}", rng.standard_normal((c, n)).astype(np.float32) * 0.3),
                  graphs.init(f"b{i}", rng.standard_normal(n).astype(np.float32))]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["B", 4, n]))
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, c])], outputs,
                             inits)


def padded_conv(auto_pad=None):
    rng = np.random.default_rng(0)
    attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [1, 1, 1, 1]}
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3], **attrs)
    return graphs.make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 6, 6])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, 6, 6])],
                             [graphs.init("w", rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3),
                              graphs.init("b", rng.standard_normal(8).astype(np.float32))])


def conv_outliers(x):
    x[:, 1] *= 30.0
    x[:, 2] += 10.0


def share_zero_point(plan):
    """The plan as ``dgq_groups`` writes it when a shared zero point wins on held-out data."""
    sigma, z = shared_zero_point(plan.group_min, plan.group_max, plan.spec, plan.scales)
    plan.scales, plan.zero_points = sigma, np.full_like(plan.zero_points, z)


def compile_affine(model, arrays, abits=8, groups=4, conv_outputs=False, shared=False, bias_correction=False):
    """Compiled with DGQ's plans and the affine lowering; without ``bias_correction`` the outputs keep
    the exact bound against DGQ's reference that the tests below assert."""
    batches = [CalibrationBatch({"x": x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    ctx = CompileContext(model, QuantSettings(abits=abits), batches)
    reference = {}
    QuantizeWeights().call(ctx)
    reference["model"] = ctx.model()  # integer weights, float activations: Ŵ for the reference
    DgqGroups(DgqGroupsConfig(groups=groups, validate=False)).call(ctx)
    if shared:
        for plan in ctx.group_plans.values():
            share_zero_point(plan)
    # Conv outputs stay float unless asked, so outputs compare with DGQ's reference directly.
    InsertActivationQDQ(InsertActivationQDQ.Config(quantize_conv_outputs=conv_outputs)).call(ctx)
    assert OrtTarget(OrtTarget.Config(bias_correction=bias_correction)).lower(ctx).modified
    return ctx, reference["model"]


def run(model, feeds, outputs=None):
    session = make_session(model, optimize=False)
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def with_outputs(model, names):
    return add_outputs(model, names)


def gemm(ctx, name):
    return next(n for n in ctx.graph.nodes if n.name == name)


def codes_and_weight_scale(ctx, node_name):
    """(codes tensor name, per-tensor s, z, the re-quantized weight's scale) of one lowered GEMM."""
    node = gemm(ctx, node_name)
    dq = node.inputs[0].inputs[0]
    assert dq.op == "DequantizeLinear" and dq.inputs[1].values.size == 1  # one per-tensor grid
    w_dq = node.inputs[1].inputs[0]
    return dq.inputs[0].name, dq.inputs[1].values.item(), int(dq.inputs[2].values.item()), w_dq.inputs[1].values


def assert_dgq_codes(got, expected, exact):
    if exact:
        np.testing.assert_array_equal(got, expected)
        return
    differ = got.astype(np.int16) != expected.astype(np.int16)
    assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).max() <= 1
    assert differ.mean() <= TIE_SHARE, differ.mean()


def assert_within_requantization_bound(got, reference, ratio, w_scale, x_hat, reference_w_scale):
    """|Y − Y_ref| ≤ Σ_c |x̂_c|·(s'_w[n]/(2·r_c) + s_w[n]/2) (+ float32 rounding of the sums): the GEMM
    computes x̂·Ŵ'/r (the bias takes δ through Ŵ'), Ŵ' = diag(r)·W re-quantized, Ŵ the reference's weight."""
    x_hat = np.abs(np.asarray(x_hat, np.float64))
    bound = ((x_hat / ratio).sum(axis=-1, keepdims=True) * w_scale.reshape(1, 1, -1) / 2
             + x_hat.sum(axis=-1, keepdims=True) * reference_w_scale.reshape(1, 1, -1) / 2
             + 1e-5 * np.abs(reference).max())
    assert np.all(np.abs(got - reference) <= bound), float(np.max(np.abs(got - reference) - bound))


def kernels(ctx, tmp_path):
    path = tmp_path / "lowered.onnx"
    onnx.save(to_model(ctx.graph, ctx.template), path)
    return count_kernels(path)


@pytest.mark.parametrize("abits", [8, 6])
def test_layernorm_absorbs_the_affine_and_the_codes_are_dgqs(tmp_path, abits):
    model = ln_linear_model()
    ctx, weights_only = compile_affine(model, feeds((2, 4, 16), count=4), abits=abits)
    plan = ctx.group_plans["h"]
    record = next(r for r in ctx.records if r.pass_name == "ort" and r.node == "fc0")
    assert plan.axis == "channel" and record.lowering == AFFINE and "LayerNormalization" in record.details["codes"]
    assert not ctx.fallbacks  # nothing explicit at run time
    assert record.details.get("narrowed_container", False) == (abits < 8)  # the report lists it as simulated
    x = feeds((3, 4, 16), seed=7, count=1)[0]
    codes_name, s, z, w_scale = codes_and_weight_scale(ctx, "fc0")
    lowered = with_outputs(to_model(ctx.graph, ctx.template), [codes_name])
    got = run(lowered, {"x": x})
    h = run(with_outputs(weights_only, ["h"]), {"x": x})["h"]
    spec = QuantSpec(bits=abits, granularity="groups", axis=-1)
    expected_codes = quantize(h, plan.element_scale(), plan.element_zero_point(), spec, axis=-1)
    assert_dgq_codes(got[codes_name], expected_codes, exact=False)
    assert got[codes_name].max() <= 2**abits - 1
    reference = run(weights_only, {"x": x}, ["y0"])  # float GEMM on the DGQ-dequantized input:
    x_hat = fake_quantize(h, spec, plan.scales, plan.zero_points, plan.labels)
    w_hat = onnx.numpy_helper.to_array(next(i for i in weights_only.graph.initializer if i.name.endswith("int8")))
    del reference
    expected = x_hat @ (w_hat.astype(np.float32) * _weight_scale(weights_only)) + _bias(model, "b0")
    assert_within_requantization_bound(got["y0"], expected, plan.element_scale() / s, w_scale, x_hat,
                                       _weight_scale(weights_only))
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 1 and found.float_gemms == 0


def _weight_scale(model):
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer
                                           if i.name.endswith("quantize_weights/scale")))


def _bias(model, name):
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_graph_input_takes_an_explicit_div_add_and_keeps_the_codes(tmp_path):
    model = graphs.linear_model(k=16, n=8)
    ctx, weights_only = compile_affine(model, feeds((2, 4, 16), outlier=channel_outliers))
    plan = ctx.group_plans["x"]
    assert ctx.fallbacks and "Div + Add" in ctx.fallbacks[0]
    x = feeds((3, 4, 16), seed=7, count=1, outlier=channel_outliers)[0]
    codes_name, s, z, w_scale = codes_and_weight_scale(ctx, "fc")
    got = run(with_outputs(to_model(ctx.graph, ctx.template), [codes_name, "biased"]), {"x": x})
    spec = QuantSpec(bits=8, granularity="groups", axis=-1)
    assert_dgq_codes(got[codes_name], quantize(x, plan.element_scale(), plan.element_zero_point(), spec, axis=-1),
                     exact=False)
    w_hat = onnx.numpy_helper.to_array(next(i for i in weights_only.graph.initializer if i.name.endswith("int8")))
    x_hat = fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels)
    expected = x_hat @ (w_hat.astype(np.float32) * _weight_scale(weights_only)) + _bias(model, "b")
    assert_within_requantization_bound(got["biased"], expected, plan.element_scale() / s, w_scale, x_hat,
                                       _weight_scale(weights_only))
    assert kernels(ctx, tmp_path).integer_gemms == 1


def test_two_gemms_share_one_quantizer_and_each_runs_one_integer_kernel(tmp_path):
    ctx, _ = compile_affine(ln_linear_model(readers=2), feeds((2, 4, 16)))
    records = [r for r in ctx.records if r.pass_name == "ort" and "group_axis" in r.details]
    assert sorted(r.node for r in records) == ["fc0", "fc1"] and {r.lowering for r in records} == {AFFINE}
    assert codes_and_weight_scale(ctx, "fc0")[0] == codes_and_weight_scale(ctx, "fc1")[0]
    assert sum(n.op == "QuantizeLinear" for n in ctx.graph.nodes) == 1
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("MatMulIntegerToFloat") == 2 and found.float_gemms == 0


def test_padded_conv_keeps_dgqs_codes_and_runs_as_qlinearconv(tmp_path):
    model = padded_conv()
    ctx, weights_only = compile_affine(model, feeds((2, 4, 6, 6), outlier=conv_outliers))
    plan = ctx.group_plans["x"]
    assert plan.axis == "channel" and gemm(ctx, "conv").attrs["pads"] == [0, 0, 0, 0]
    x = feeds((2, 4, 6, 6), seed=5, count=1, outlier=conv_outliers)[0]
    codes_name, s, z, w_scale = codes_and_weight_scale(ctx, "conv")
    got = run(with_outputs(to_model(ctx.graph, ctx.template), [codes_name]), {"x": x})
    spec = QuantSpec(bits=8, granularity="groups", axis=1)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))  # the Pad reads real zeros: their codes are z_g
    assert_dgq_codes(got[codes_name], quantize(padded, plan.element_scale(), plan.element_zero_point(), spec,
                                               axis=1), exact=False)
    x_hat = fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels)
    expected = run(weights_only, {"x": x_hat})["y"]  # float Conv on X̂ and Ŵ: DGQ's reference
    y = np.abs(s * (got[codes_name].astype(np.float64) - z))
    taps = np.ones((1, 4, 3, 3))
    # Σ over each output's 3×3×C window of |y|, times s'_w[o]/2: the re-quantization bound.
    from numpy.lib.stride_tricks import sliding_window_view
    window = sliding_window_view(y, (3, 3), axis=(2, 3)).sum(axis=(1, 4, 5))[:, None]
    x_abs = np.pad(np.abs(x_hat), ((0, 0), (0, 0), (1, 1), (1, 1)))
    x_window = sliding_window_view(x_abs, (3, 3), axis=(2, 3)).sum(axis=(1, 4, 5))[:, None]
    bound = (window * w_scale.reshape(1, -1, 1, 1) / 2 + x_window * _weight_scale(weights_only).reshape(1, -1, 1, 1)
             / 2 + 1e-5 * np.abs(expected).max())
    assert taps.size == 36 and np.all(np.abs(got["y"] - expected) <= bound)
    # With its output quantized too (as the recipe does), ORT fuses it into one QLinearConv.
    ctx, _ = compile_affine(model, feeds((2, 4, 6, 6), outlier=conv_outliers), conv_outputs=True)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("QLinearConv") == 1 and found.float_gemms == 0
    assert "ConvInteger" not in found.op_types


def test_shared_zero_point_keeps_the_conv_padding_and_needs_one_div(tmp_path):
    """δ = 0: no Pad, no Add, the Conv keeps its pads (a padded zero has code z in every channel)."""
    model = padded_conv()
    ctx, weights_only = compile_affine(model, feeds((2, 4, 6, 6), outlier=conv_outliers), shared=True)
    plan = ctx.group_plans["x"]
    assert len(set(plan.zero_points.tolist())) == 1 and len(set(plan.scales.tolist())) > 1
    lowered_ops = [n.op for n in ctx.graph.nodes]
    assert "Pad" not in lowered_ops and "Add" not in lowered_ops and lowered_ops.count("Div") == 1
    assert gemm(ctx, "conv").attrs["pads"] == [1, 1, 1, 1]
    x = feeds((2, 4, 6, 6), seed=5, count=1, outlier=conv_outliers)[0]
    codes_name, s, z, w_scale = codes_and_weight_scale(ctx, "conv")
    assert z == int(plan.zero_points[0])
    got = run(with_outputs(to_model(ctx.graph, ctx.template), [codes_name]), {"x": x})
    spec = QuantSpec(bits=8, granularity="groups", axis=1)
    assert_dgq_codes(got[codes_name], quantize(x, plan.element_scale(), plan.element_zero_point(), spec, axis=1),
                     exact=False)
    x_hat = fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels)
    expected = run(weights_only, {"x": x_hat})["y"]
    from numpy.lib.stride_tricks import sliding_window_view
    pad = ((0, 0), (0, 0), (1, 1), (1, 1))  # padded positions have code z: y = 0 and x̂ = 0 there
    window = sliding_window_view(np.pad(np.abs(s * (got[codes_name].astype(np.float64) - z)), pad), (3, 3),
                                 axis=(2, 3)).sum(axis=(1, 4, 5))[:, None]
    x_window = sliding_window_view(np.pad(np.abs(x_hat), pad), (3, 3), axis=(2, 3)).sum(axis=(1, 4, 5))[:, None]
    bound = (window * w_scale.reshape(1, -1, 1, 1) / 2 + x_window * _weight_scale(weights_only).reshape(1, -1, 1, 1)
             / 2 + 1e-5 * np.abs(expected).max())
    assert np.all(np.abs(got["y"] - expected) <= bound)
    ctx, _ = compile_affine(model, feeds((2, 4, 6, 6), outlier=conv_outliers), conv_outputs=True, shared=True)
    found = kernels(ctx, tmp_path)
    assert found.op_types.get("QLinearConv") == 1 and found.float_gemms == 0


def test_auto_padded_conv_is_not_matched_and_says_why():
    ctx, _ = compile_affine(padded_conv(auto_pad="SAME_UPPER"), feeds((2, 4, 6, 6), outlier=conv_outliers))
    record = next(r for r in ctx.records if r.pass_name == "ort" and "group_axis" in r.details)
    assert record.lowering == SIMULATED and "auto_pad" in record.details["reason"]


def test_input_channel_energy_sums_squared_weights_over_everything_but_the_input_channel():
    from qcompiler.lowering.channel_affine import input_channel_energy
    from qcompiler.lowering.channel_groups import dequantized_weight

    for model, node_name, axis in ((padded_conv(), "conv", 1), (ln_linear_model(), "fc0", 0),
                                   (graphs.gemm_model(trans_b=1, alpha=0.5), "head", 1),
                                   (graphs.gemm_model(trans_b=0), "head", 0)):
        ctx = CompileContext(model, QuantSettings(), [])
        QuantizeWeights().call(ctx)
        node = gemm(ctx, node_name)
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        weight = np.moveaxis(dequantized_weight(node).astype(np.float64) * alpha, axis, 0)
        expected = np.square(weight).reshape(weight.shape[0], -1).sum(axis=1)
        np.testing.assert_allclose(input_channel_energy(node), expected, rtol=1e-6)


def _grouped_h(model, channels: int):
    """(ctx, r) after DGQ's 4 channel groups on h (no validation): r_c = s_c / max s per input channel."""
    arrays = feeds((2, 4, channels), outlier=channel_outliers)
    batches = [CalibrationBatch({"x": x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    ctx = CompileContext(model, QuantSettings(), batches)
    QuantizeWeights().call(ctx)
    DgqGroups(DgqGroupsConfig(groups=4, validate=False)).call(ctx)
    plan = ctx.group_plans["h"]
    return ctx, plan.element_scale().astype(np.float64) / float(plan.scales.max())


@pytest.mark.parametrize("columns", [3, 64])
def test_rescaled_weight_error_is_the_error_of_the_weight_the_lowering_writes(columns):
    """RescaledWeightError(r) per input channel = Σ_n (W − Ŵ'/r)² for the Ŵ' that the affine lowering
    writes into the graph (exact with every column scored; an unbiased N/columns estimate with 3)."""
    from qcompiler.lowering.channel_affine import RescaledWeightError
    from qcompiler.lowering.channel_groups import dequantized_weight

    ctx, ratio = _grouped_h(ln_linear_model(n=8), 16)
    probe = RescaledWeightError(gemm(ctx, "fc0"), ctx.weight_rules["fc0"], columns=columns)
    estimated, unscaled = probe(ratio), probe(np.ones_like(ratio))
    source = ctx.weight_rules["fc0"].source.astype(np.float64)
    own_error = np.square(source - dequantized_weight(gemm(ctx, "fc0"))).sum(axis=1)
    InsertActivationQDQ().call(ctx)
    OrtTarget().lower(ctx)
    written = dequantized_weight(gemm(ctx, "fc0")).astype(np.float64)
    exact = np.square(source - written / ratio[:, None]).sum(axis=1)
    if columns >= 8:
        np.testing.assert_allclose(estimated, exact, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(unscaled, own_error, rtol=1e-4, atol=1e-12)  # r ≡ 1: the rule's own error
    else:
        assert estimated.shape == exact.shape and np.all(estimated >= 0)
    # the narrow groups' channels (small r) carry the larger error per unit of weight
    narrow = ratio < 0.5
    assert narrow.any() and exact[narrow].mean() > own_error[narrow].mean()


def nonzero_mean_outliers(x):
    """Channel outliers on a positive-mean input (GELU/SiLU outputs have one): the weight error then
    leaves a mean offset on every output."""
    channel_outliers(x)
    x += 2.0


def test_bias_correction_subtracts_the_calibrated_mean_weight_error(tmp_path):
    """b' −= Σ_c μ_c·(Ŵ'[c, n]/r_c − W[c, n]): the corrected output is the uncorrected one minus that
    offset exactly, and the mean output error over the calibration data shrinks."""
    model = graphs.linear_model(k=16, n=8)
    arrays = feeds((2, 4, 16), count=4, outlier=nonzero_mean_outliers)
    plain, _ = compile_affine(model, arrays)
    corrected, _ = compile_affine(model, arrays, bias_correction=True)
    plan = corrected.group_plans["x"]
    x = np.concatenate(arrays)
    np.testing.assert_allclose(plan.channel_mean, x.reshape(-1, 16).mean(axis=0), rtol=1e-6)
    codes_name, s, _, w_scale = codes_and_weight_scale(corrected, "fc")
    w_dq = gemm(corrected, "fc").inputs[1].inputs[0]
    deployed = w_dq.inputs[0].values.astype(np.float64) * w_scale / (plan.element_scale()[:, None] / s)
    weight = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")).astype(np.float64)
    offset = plan.channel_mean @ (deployed - weight)
    got = {name: run(with_outputs(to_model(c.graph, c.template), ["biased"]), {"x": x})["biased"]
           for name, c in (("plain", plain), ("corrected", corrected))}
    np.testing.assert_allclose(got["corrected"], got["plain"] - offset, rtol=1e-5, atol=1e-5 * np.abs(got["plain"]).max())
    reference = x.astype(np.float64) @ weight + _bias(model, "b")
    mean_error = {name: np.abs((y - reference).reshape(-1, 8).mean(axis=0)).max() for name, y in got.items()}
    assert mean_error["corrected"] < mean_error["plain"], mean_error


def test_sampled_weight_error_is_unbiased_and_close_to_every_column_scored():
    """K = 128 input channels, N = 512 output channels, 128 scored (the 64 of largest scale exactly,
    64 drawn from the rest): over 40 seeds every estimate of Σ_c error_c is within 30 % of scoring
    all 512 (the narrowest groups' few channels carry most of it, so one seed's spread is ~8 %) and
    their mean within 3 %: the draw is unbiased (``scale_search.column_draw``)."""
    from qcompiler.lowering.channel_affine import RescaledWeightError

    ctx, ratio = _grouped_h(ln_linear_model(c=128, n=512), 128)
    node, rule = gemm(ctx, "fc0"), ctx.weight_rules["fc0"]
    full = RescaledWeightError(node, rule, columns=10**6)(ratio).sum()
    estimates = np.array([RescaledWeightError(node, rule, columns=128, seed=seed)(ratio).sum()
                          for seed in range(40)]) / full
    assert np.all(np.abs(estimates - 1.0) < 0.30), estimates
    assert abs(estimates.mean() - 1.0) < 0.03, estimates.mean()
