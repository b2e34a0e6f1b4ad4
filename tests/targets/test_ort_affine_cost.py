"""The ORT target's run-time cost of a DGQ channel affine (``affine_run_time_ops``), which
``dgq_groups`` weighs against each tensor's held-out gain, equals the elementwise ops its lowering
adds: a match (the prediction before lowering is the count after it) over the lowering's cases."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.calibration.holdout import GridScores
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.passes import DgqGroups, InsertActivationQDQ, QuantizeWeights
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.targets.ort import OrtTarget
from qcompiler.targets.ort_groups import affine_run_time_ops
from tests import graphs
from tests.passes.test_dgq_groups import channel_outliers, feeds
from tests.targets.test_ort_affine import conv_outliers, ln_linear_model, padded_conv, share_zero_point

ELEMENTWISE = ("Div", "Add", "Pad")


def shifted_linear_model(c=16, n=8, bias=False):
    """x → Add(per-channel offsets) → h → MatMul(W) [+ b] → y: no Norm can take the affine."""
    rng = np.random.default_rng(1)
    offsets = np.zeros(c, np.float32)
    offsets[5], offsets[9] = 20.0, -6.0
    nodes = [helper.make_node("Add", ["x", "offsets"], ["h"], name="shift"),
             helper.make_node("MatMul", ["h", "W"], ["mm" if bias else "y"], name="fc")]
    inits = [graphs.init("offsets", offsets), graphs.init("W", rng.standard_normal((c, n)).astype(np.float32) * 0.3)]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="fc_bias"))
        inits.append(graphs.init("b", rng.standard_normal(n).astype(np.float32)))
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, c])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, n])], inits)


def bias_free_ln_model(c=16, n=8):
    """x → LayerNorm → h → MatMul(W) → y with no bias Add (an attention projection)."""
    rng = np.random.default_rng(2)
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    gamma[3] = 30.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="fc")]
    inits = [graphs.init("gamma", gamma), graphs.init("beta", beta),
             graphs.init("W", rng.standard_normal((c, n)).astype(np.float32) * 0.3)]
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, c])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, n])], inits)


def elementwise_ops(ctx) -> int:
    return sum(node.op in ELEMENTWISE for node in ctx.graph.nodes)


def predicted_and_added(model, arrays, tensor, shared, bias_correction):
    batches = [CalibrationBatch({"x": x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    ctx = CompileContext(model, QuantSettings(), batches)
    QuantizeWeights().call(ctx)
    DgqGroups(DgqGroupsConfig(groups=4, validate=False)).call(ctx)
    plan = ctx.group_plans[tensor]
    if shared:
        share_zero_point(plan)
    free_zero_points = not np.all(plan.element_zero_point() == plan.element_zero_point()[0])
    predicted = affine_run_time_ops(ctx, ctx.graph.tensors()[tensor], shared, bias_correction)
    InsertActivationQDQ(InsertActivationQDQ.Config(quantize_conv_outputs=False)).call(ctx)
    before = elementwise_ops(ctx)
    OrtTarget(OrtTarget.Config(bias_correction=bias_correction)).lower(ctx)
    return predicted, elementwise_ops(ctx) - before, free_zero_points


CASES = [  # (model, grouped tensor, data shape, outliers, expected ops: shared, free)
    ("norm absorbs, bias Add", lambda: ln_linear_model(), "h", (2, 4, 16), channel_outliers, (0, 0)),
    ("norm absorbs, no bias", bias_free_ln_model, "h", (2, 4, 16), channel_outliers, (0, 1)),
    ("no Norm, bias Add", lambda: shifted_linear_model(bias=True), "h", (2, 4, 16), channel_outliers, (1, 2)),
    ("no Norm, no bias", shifted_linear_model, "h", (2, 4, 16), channel_outliers, (1, 3)),
    ("padded Conv", padded_conv, "x", (2, 4, 6, 6), conv_outliers, (1, 3)),
]


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_predicted_cost_is_the_ops_the_lowering_adds(case, shared, bias_correction):
    _, build, tensor, shape, outliers, expected = case
    arrays = feeds(shape, outlier=outliers)
    predicted, added, free_zero_points = predicted_and_added(build(), arrays, tensor, shared, bias_correction)
    assert shared or free_zero_points  # the data gives the groups their own zero points
    assert predicted == added
    if not bias_correction:
        assert predicted == expected[0 if shared else 1]


def test_run_time_ops_set_the_gain_each_grid_must_buy():
    scores = GridScores((0.0, 0.5), tensor_error=100.0, free=(10.0, 20.0), shared=(50.0, 12.0))
    assert scores.choose(1.0, shared_ops=0, free_ops=0) == (0.0, False)  # free where it costs nothing
    assert scores.choose(1.0, shared_ops=1, free_ops=2) == (0.5, True)  # 0.8 dB does not pay for an Add
    assert scores.choose(4.0, shared_ops=1, free_ops=3) == (0.5, True)  # 9.2 dB pays for one op, not three
    assert scores.choose(4.0, shared_ops=3, free_ops=3) is None  # 10 dB < 3 × 4 dB
    assert GridScores((0.0,), 100.0, (100.0,), (100.0,)).choose(1.0, 0, 0) is None  # no gain, even for free
