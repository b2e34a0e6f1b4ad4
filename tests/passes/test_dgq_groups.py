"""dgq_groups: D_channel / D_pixel from calibration, d* = argmax, K-means groups and their parameters."""

import numpy as np
import pytest

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.passes import DgqGroups, QuantizeWeights
from qcompiler.passes.dgq_groups import DgqGroupsConfig, axis_spread, kmeans_labels
from qcompiler.quant import QuantSpec, scale_zero_point
from tests import graphs


def feeds(shape, seed=0, count=4, outlier=None):
    """Normal data; ``outlier(x)`` scales some channels/tokens/pixels in place."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.standard_normal(shape).astype(np.float32)
        if outlier is not None:
            outlier(x)
        batches.append(x)
    return batches


#: DGQ's planning as the paper has it; held-out validation has its own tests below.
PAPER = DgqGroupsConfig(validate=False)


def planned(model, name, arrays, config=PAPER, wbits=8, abits=8):
    batches = [CalibrationBatch({name: x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    ctx = CompileContext(model, QuantSettings(wbits=wbits, abits=abits), batches)
    QuantizeWeights().call(ctx)
    result = DgqGroups(config).call(ctx)
    return ctx, result, ctx.group_plans


def channel_outliers(x):
    x[..., 3] *= 40.0
    x[..., 7] += 20.0


def token_outliers(x):
    x[:, 2, :] = x[:, 2, :] * 4.0 + 30.0  # one token far from the others in every channel


def test_spread_formula_matches_numpy_on_the_calibration_data():
    arrays = feeds((2, 4, 16), outlier=channel_outliers)
    _, _, plans = planned(graphs.linear_model(k=16, n=8), "x", arrays)
    data = np.concatenate(arrays)
    plan = plans["x"]
    # D_d = (max_i a^max − min_i a^max) + (max_i a^min − min_i a^min), a^max_i over all but axis i.
    channel = np.ptp(data.max(axis=(0, 1))) + np.ptp(data.min(axis=(0, 1)))
    token = np.ptp(data.max(axis=(0, 2))) + np.ptp(data.min(axis=(0, 2)))
    assert plan.d_channel == pytest.approx(channel, rel=1e-6)
    assert plan.d_pixel == pytest.approx(token, rel=1e-6)


def test_channel_outliers_pick_channel_groups():
    _, result, plans = planned(graphs.linear_model(k=16, n=8), "x", feeds((2, 4, 16), outlier=channel_outliers))
    plan = plans["x"]
    assert plan.d_star == plan.axis == "channel" and plan.labels.shape == (16,)
    assert not result.modified  # analysis only: the target lowers the plans
    # The ×40 channel cannot share a group with unit-variance channels: K-means isolates it.
    assert np.sum(plan.labels == plan.labels[3]) == 1


def test_token_outliers_pick_pixel_groups():
    _, _, plans = planned(graphs.linear_model(k=16, n=8), "x", feeds((2, 4, 16), outlier=token_outliers))
    plan = plans["x"]
    assert plan.d_star == plan.axis == "pixel" and plan.labels.shape == (4,)


def test_group_ranges_cover_members_and_scales_never_exceed_the_per_tensor_scale():
    arrays = feeds((2, 4, 16), outlier=channel_outliers)
    _, _, plans = planned(graphs.linear_model(k=16, n=8), "x", arrays)
    plan, data = plans["x"], np.concatenate(arrays)
    low, high = data.min(axis=(0, 1)), data.max(axis=(0, 1))
    assert np.all(plan.group_min[plan.labels] <= low) and np.all(plan.group_max[plan.labels] >= high)
    # A group's range is a subset of the tensor's, so s_g = range_g/255 ≤ range/255.
    tensor_scale, _ = scale_zero_point(data.min(), data.max(), QuantSpec(bits=8))
    assert np.all(plan.scales <= tensor_scale * (1 + 1e-6))
    expected = scale_zero_point(plan.group_min, plan.group_max, QuantSpec(bits=8))
    np.testing.assert_array_equal(plan.scales, expected[0])
    np.testing.assert_array_equal(plan.zero_points, expected[1])


def test_kmeans_is_deterministic_and_numbered_by_centre():
    rng = np.random.default_rng(3)
    points = np.sort(rng.standard_normal((40, 2)) * [1.0, 5.0], axis=1)
    first, second = kmeans_labels(points, 6), kmeans_labels(points, 6)
    np.testing.assert_array_equal(first, second)
    centres = [points[first == g].mean() for g in range(6)]
    assert centres == sorted(centres)


def test_kmeans_caps_groups_at_distinct_points():
    points = np.array([[0.0, 1.0], [0.0, 1.0], [-2.0, 3.0], [-5.0, 0.0]])
    labels = kmeans_labels(points, 16)
    assert labels.max() + 1 == 3  # three distinct (min, max) points can form at most three groups
    assert labels[0] == labels[1]


def test_axis_spread_of_identical_indices_is_zero():
    assert axis_spread(np.full(5, -1.0), np.full(5, 2.0)) == 0.0


def test_default_groups_follow_the_weight_width():
    def graded(x):
        x *= np.linspace(0.1, 30.0, 64, dtype=np.float32)  # 64 distinct channel ranges: K-means uses all K

    arrays = feeds((2, 4, 64), outlier=graded)
    _, _, w8 = planned(graphs.linear_model(k=64, n=8), "x", arrays, wbits=8)
    _, _, w4 = planned(graphs.linear_model(k=64, n=8), "x", arrays, wbits=4)
    assert w8["x"].groups == 16 and w4["x"].groups == 8  # the paper's K for W8A8/W8A6 and for W4A8


def test_conv_inputs_use_channel_groups_unless_auto():
    def pixel_outliers(x):
        x[:, :, 2, 3] *= 40.0

    arrays = feeds((1, 4, 8, 8), outlier=pixel_outliers)
    _, _, plans = planned(graphs.conv_model(), "x", arrays)
    assert plans["x"].d_star == "pixel" and plans["x"].axis == "channel" and plans["x"].channel_axis == 1
    _, _, auto = planned(graphs.conv_model(), "x", arrays, DgqGroupsConfig(validate=False, conv_axis="auto"))
    assert auto["x"].axis == "pixel" and auto["x"].labels.shape == (64,)


def _dynamic_tokens(model):
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "T"
    return model


def test_dynamic_tokens_fall_back_to_channel_groups_or_raise():
    arrays = feeds((2, 4, 16), outlier=token_outliers)
    _, result, plans = planned(_dynamic_tokens(graphs.linear_model(k=16, n=8)), "x", arrays)
    assert plans["x"].d_star == "pixel" and plans["x"].axis == "channel"
    assert any("not static" in note for note in result.notes)
    with pytest.raises(PassError, match="not static"):
        planned(_dynamic_tokens(graphs.linear_model(k=16, n=8)), "x", arrays,
                DgqGroupsConfig(validate=False, on_dynamic_pixels="error"))


def test_graph_without_quantized_gemm_plans_nothing():
    _, result, plans = planned(graphs.layernorm_model(), "x", feeds((2, 4, 8)))
    assert not result.modified and plans == {}


def test_requires_calibration():
    ctx = CompileContext(graphs.linear_model(), QuantSettings())
    with pytest.raises(PassError, match="calibration"):
        DgqGroups().requires(ctx)


# Held-out validation: groups are kept only where they beat per-tensor on rows the fit never saw.

def _validated(arrays, **config):
    return planned(graphs.linear_model(k=16, n=8), "x", arrays, DgqGroupsConfig(**config))


def test_validation_keeps_groups_that_hold_on_held_out_rows():
    """Persistent channel outliers: every held-out row lies in the fitted groups' ranges, groups win."""
    _, result, plans = _validated(feeds((8, 4, 16), outlier=channel_outliers))
    assert "x" in plans and plans["x"].axis == "channel"
    assert any("1 of 1 channel-grouped tensors keep groups" in note for note in result.notes)


def test_validation_widens_or_drops_groups_that_clip_on_held_out_rows():
    """Channel 5 spikes to 30 only in held-out rows (row 3 of every batch): its fitted group range
    (unit normal) would clip the spike by ~100 steps, while the per-tensor range (set by the ×40
    channel 3) holds it. With margin 0 only, per-tensor wins; with margins, groups are kept but
    widened toward the tensor range (a margin > 0, applied to the ranges of all the data)."""
    def spike_in_held_out_rows(x):
        channel_outliers(x)
        x[3, :, 5] = 30.0

    arrays = feeds((4, 4, 16), outlier=spike_in_held_out_rows)
    _, result, plans = _validated(arrays, margins=(0.0,))
    assert "x" not in plans
    assert any("0 of 1 channel-grouped tensors keep groups" in note for note in result.notes)
    _, _, widened = _validated(arrays)
    plan, paper = widened["x"], planned(graphs.linear_model(k=16, n=8), "x", arrays)[2]["x"]
    assert np.array_equal(plan.labels, paper.labels)
    assert np.all(plan.group_max >= paper.group_max) and np.any(plan.group_max > paper.group_max)


def test_validation_gain_threshold_zero_keeps_what_an_infinite_one_drops():
    arrays = feeds((8, 4, 16), outlier=channel_outliers)
    assert "x" in _validated(arrays, min_gain_db=0.0)[2]
    assert "x" not in _validated(arrays, min_gain_db=float("inf"))[2]


def test_validation_needs_enough_rows_to_hold_out():
    """Two batches of two rows: nothing to hold out, so DGQ's plan stands, and the notes say so."""
    arrays = feeds((2, 4, 16), outlier=channel_outliers, count=2)
    _, result, plans = _validated(arrays)
    _, _, paper = planned(graphs.linear_model(k=16, n=8), "x", arrays)
    assert np.array_equal(plans["x"].scales, paper["x"].scales)
    assert any("groups not validated" in note for note in result.notes)


def test_held_out_rows_ride_on_the_statistics_pass(monkeypatch):
    """Validation reads the calibration data once: one forward pass per batch (fit and held-out parts)
    gives the statistics and the held-out rows. The rows are ``held_out_rows``' own pass's seeded draw
    bit for bit (same order), and the merged statistics equal a plain capture's."""
    from qcompiler.calibration import reductions, row_samples
    from qcompiler.calibration.holdout import held_out_rows, split_holdout

    model, arrays = graphs.conv_model(), feeds((4, 4, 8, 8), count=3, outlier=lambda x: x.__setitem__(
        (slice(None), 2), x[:, 2] * 30.0))
    batches = [CalibrationBatch({"x": x}, {}, f"test#{i}") for i, x in enumerate(arrays)]
    runs = []
    for module in (reductions, row_samples):
        original = module.run_batch
        monkeypatch.setattr(module, "run_batch", lambda *a, _m=module.__name__, _f=original: runs.append(_m) or _f(*a))
    ctx = CompileContext(model, QuantSettings(), batches)
    QuantizeWeights().call(ctx)
    result = DgqGroups(DgqGroupsConfig(min_gain_db=0.0)).call(ctx)
    assert any("held-out validation" in note for note in result.notes)
    assert runs == [reductions.__name__] * 2 * len(batches)  # fit rows + held-out rows of each batch

    monkeypatch.undo()
    fresh = CompileContext(model, QuantSettings(), batches)
    QuantizeWeights().call(fresh)
    dgq = DgqGroups(DgqGroupsConfig())
    targets = dgq._targets(fresh, [])
    axes = {name: axis for name, (_, axis) in targets.items()}
    split = split_holdout(batches, 4)
    sampler = dgq._holdout_sampler(fresh, split, targets)
    fresh.statistics_of_parts(axes, [split.fit, split.held_out], rows=sampler)
    assert sampler.done and set(axes) == {"x", "r1"}
    alone = held_out_rows(fresh, split.held_out, {name: 1 for name in axes}, 512, 0)
    for name in axes:
        joined = np.concatenate([sampler.samples[name][b] for b in sorted(sampler.samples[name])])[:512]
        np.testing.assert_array_equal(joined, alone[name])
    plain = CompileContext(model, QuantSettings(), batches)
    QuantizeWeights().call(plain)
    merged, whole = fresh.statistics(axes), plain.statistics(axes)
    for name in axes:
        for field in ("channel_min", "channel_max", "index_min", "index_max"):
            np.testing.assert_array_equal(getattr(merged[name], field), getattr(whole[name], field))
