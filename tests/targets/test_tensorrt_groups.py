"""DGQ channel groups on the TensorRT target (``targets.tensorrt_groups``): the symmetric affine's bias.

The GEMM reads X' = (X − μ)/r on one symmetric grid s and runs Ŵ' = requantize(diag(r)·W) (scale s'_w
per output n); X̂ = r·s·q + μ is DGQ's dequantized input (its own 256 levels per group). The bias must
take μ through Ŵ' (b' = b + (μ/r)·Ŵ'), so the output is X̂·Ŵ'/r + b and its error against X̂·W + b is
W''s rounding only:
    |Y[.., n] − (X̂·W + b)[.., n]| ≤ Σ_c |X̂_c|·s'_w[n]/(2·r_c)   (+ float32 rounding, 1e-5 of max|Y|).
A bias b + μ·Ŵ (the old lowering) leaves Σ_c (μ_c/r_c)·ε[c, n] on every output, X = 0 included: with
GELU-like channels (μ ≈ half a group's range, r down to 1/40) that breaks the bound.
The grids are the plan's (the pass decides them), a shared zero point's wider σ_g included: the codes
are the plan's codes − 128 (up to float rounding at .5 ties), not codes of grids re-fitted to the groups'
calibrated ranges, which held-out rows exceed more often.
"""

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.graph import add_outputs
from qcompiler.passes import DgqGroups, InsertActivationQDQ, QuantizeWeights
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.quant import QuantSpec, fake_quantize
from qcompiler.runtimes.ort import make_session
from qcompiler.targets.tensorrt import TensorRTTarget
from qcompiler.targets.tensorrt_groups import AFFINE
from tests import graphs
from tests.targets.test_ort_affine import TIE_SHARE, share_zero_point

C, N = 64, 16


def gelu_like(rng, rows=4):
    """(rows, 8, C): mostly near 0, down to −0.17·a_c, up to ≈ 3·a_c, channel amplitudes a_c over 1 to 40."""
    amplitude = np.geomspace(1.0, 40.0, C)[rng.permutation(C)]
    z = rng.standard_normal((rows, 8, C)) * 1.5
    gelu = 0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))
    return (gelu * amplitude).astype(np.float32)


def linear_model(rng):
    """x (graph input: no producer takes the affine, so an explicit Sub + Mul) → MatMul(W) + b → y."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias")]
    inits = [graphs.init("W", (rng.standard_normal((C, N)) * 0.1).astype(np.float32)),
             graphs.init("b", rng.standard_normal(N).astype(np.float32))]
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8, C])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, N])], inits)


def _constant(node: gs.Node, index: int) -> np.ndarray:
    return np.asarray(node.inputs[index].values, np.float64)


def _lower(shared: bool, bias_correction: bool = False):
    """(ctx, float model, calibration arrays) after DGQ (K = 8) and the TensorRT target; without
    ``bias_correction`` the plans carry no channel means, so the output keeps its exact bound."""
    rng = np.random.default_rng(0)
    model = linear_model(rng)
    calibration = [gelu_like(rng) for _ in range(3)]
    ctx = CompileContext(model, QuantSettings(wbits=8, abits=8),
                         [CalibrationBatch({"x": x}, {}, f"test#{i}") for i, x in enumerate(calibration)])
    QuantizeWeights().call(ctx)
    DgqGroups(DgqGroupsConfig(groups=8, validate=False)).call(ctx)
    if shared:
        for plan in ctx.group_plans.values():
            share_zero_point(plan)
    if not bias_correction:
        for plan in ctx.group_plans.values():
            plan.channel_mean = None
    InsertActivationQDQ().call(ctx)
    assert TensorRTTarget().lower(ctx).modified
    assert {r.lowering for r in ctx.records if r.role == "activation"} == {AFFINE}
    return ctx, model, calibration


def _run_lowered(ctx, x):
    """(Y, X̂, pieces): the lowered graph's output and its dequantized input X̂ = r·(s·q) + μ."""
    fc = next(n for n in ctx.graph.nodes if n.name == "fc")
    codes_dq, weight_dq = fc.inputs[0].inputs[0], fc.inputs[1].inputs[0]
    quantize = codes_dq.inputs[0].inputs[0]
    mul = quantize.inputs[0].inputs[0]
    sub = mul.inputs[0].inputs[0]
    assert (sub.op, mul.op) == ("Sub", "Mul") and not np.any(_constant(codes_dq, 2))
    shift, ratio = _constant(sub, 1).reshape(-1), 1.0 / _constant(mul, 1).reshape(-1)
    session = make_session(add_outputs(ctx.model(), [codes_dq.outputs[0].name]), optimize=False)
    y, codes = session.run(["y", codes_dq.outputs[0].name], {"x": x})
    x_hat = codes.astype(np.float64) * ratio + shift
    return y, x_hat, {"shift": shift, "ratio": ratio, "scale": _constant(codes_dq, 1).item(),
                      "w_scale": _constant(weight_dq, 1)}


def test_symmetric_affine_output_is_within_the_weight_requantization_bound():
    ctx, model, calibration = _lower(shared=False)
    # Held out: rows inside the calibrated ranges (no clipping) and one row of exact zeros.
    x = np.concatenate([calibration[0][:2] * 0.9, np.zeros((1, 8, C), np.float32)])
    y, x_hat, got = _run_lowered(ctx, x)
    ratio = got["ratio"]
    assert ratio.min() < 0.1 and np.abs(got["shift"]).max() > 10 * got["scale"]  # the case that matters
    assert np.all(np.abs(x_hat - x) <= got["scale"] * ratio / 2 * (1 + 1e-5) + 1e-6)
    weight, bias = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
                    .astype(np.float64) for name in ("W", "b"))
    reference = x_hat @ weight + bias
    bound = (np.abs(x_hat) / ratio).sum(axis=-1, keepdims=True) * got["w_scale"] / 2 \
        + 1e-5 * np.abs(reference).max()
    assert np.all(np.abs(y - reference) <= bound), float(np.max(np.abs(y - reference) - bound))
    np.testing.assert_allclose(y[-1], np.broadcast_to(bias, y[-1].shape), rtol=0, atol=1e-5 * np.abs(bias).max())


def test_the_plans_shared_zero_point_grids_are_kept():
    ctx, _, calibration = _lower(shared=True)
    plan = next(iter(ctx.group_plans.values()))
    # Held out, wider than calibration: values beyond the groups' calibrated ranges clip at σ_g's range.
    x = calibration[1] * 1.5
    _, x_hat, got = _run_lowered(ctx, x)
    spec = QuantSpec(bits=8, granularity="groups", axis=-1)
    want = fake_quantize(x, spec, plan.scales, plan.zero_points, plan.labels).astype(np.float64)
    step = plan.element_scale().astype(np.float64)
    differ = ~np.isclose(x_hat, want, rtol=0, atol=1e-3 * step.min())
    assert differ.mean() <= TIE_SHARE and np.all(np.abs(x_hat - want) <= step * (1 + 1e-5)), differ.mean()


def test_bias_correction_lowers_the_mean_output_error_on_calibration_data():
    """With the plans' channel means, b' −= μ·(Ŵ'/r − W) (``channel_affine.fold_affine``): the mean
    output error on the calibration rows (GELU-like, non-zero mean) shrinks."""
    errors = {}
    for corrected in (False, True):
        ctx, model, calibration = _lower(shared=False, bias_correction=corrected)
        weight, bias = (numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
                        .astype(np.float64) for name in ("W", "b"))
        x = np.concatenate(calibration)
        y, _, _ = _run_lowered(ctx, x)
        error = (y - (x.astype(np.float64) @ weight + bias)).reshape(-1, y.shape[-1])
        errors[corrected] = np.abs(error.mean(axis=0)).max()
    assert errors[True] < errors[False], errors
