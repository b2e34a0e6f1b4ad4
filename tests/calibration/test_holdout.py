"""calibration.holdout: the fit/held-out split, the grid error, and the margin scores."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.calibration.holdout import GridScores, grid_error, score_grids, split_holdout, widen
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.quant import QuantSpec, fake_quantize, scale_zero_point, shared_zero_point


def batch(rows, tag=0):
    return CalibrationBatch({"x": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * tag,
                             "scalar": np.array(1.0, np.float32)}, {"__step__": np.full(rows, tag)}, f"b{tag}")


def test_rows_are_held_out_inside_every_batch():
    split = split_holdout([batch(8, 0), batch(8, 1)], every=4)
    assert split.by == "row" and split.held_out_count == 4
    assert [b.batch_size for b in split.fit] == [6, 6]
    held = split.held_out[1]
    assert np.array_equal(held.feeds["x"], batch(8, 1).feeds["x"][[3, 7]])
    assert held.metadata["__step__"].tolist() == [1, 1] and held.feeds["scalar"].shape == ()
    # Together the two sets hold every row exactly once.
    rows = np.concatenate([*(b.feeds["x"] for b in split.fit), *(b.feeds["x"] for b in split.held_out)])
    assert sorted(rows[:, 0].tolist()) == sorted(np.concatenate([batch(8, t).feeds["x"] for t in (0, 1)])[:, 0].tolist())


def test_small_batches_are_held_out_whole_and_too_little_data_is_none():
    split = split_holdout([batch(2, t) for t in range(8)], every=4)
    assert split.by == "batch" and [b.source for b in split.held_out] == ["b3", "b7"]
    assert split_holdout([batch(2, t) for t in range(3)], every=4) is None
    assert split_holdout([], every=4) is None


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([4, 6, 8]))
def test_grid_error_equals_the_fake_quantized_error(seed, bits):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((20, 5)) * rng.uniform(0.1, 10, 5)).astype(np.float32)
    spec = QuantSpec(bits=bits, symmetric=False)
    # A range narrower than the data, so clipping is part of the error.
    scale, zero = scale_zero_point(np.quantile(rows, 0.1, axis=0), np.quantile(rows, 0.9, axis=0), spec)
    reference = fake_quantize(rows.copy(), QuantSpec(bits=bits, granularity="axis", axis=1), scale, zero)
    assert grid_error(rows, scale, zero.astype(np.float32), spec.qmax) == pytest.approx(
        float(np.square(reference.astype(np.float64) - rows).sum()), rel=1e-5)


def test_widen_interpolates_between_group_and_tensor_ranges():
    low, high = widen(np.array([-1.0, 0.0]), np.array([1.0, 2.0]), -5.0, 10.0, 0.5)
    assert low.tolist() == [-3.0, -2.5] and high.tolist() == [5.5, 6.0]
    assert widen(np.array([-1.0]), np.array([1.0]), -5.0, 10.0, 1.0)[1].tolist() == [10.0]


def test_margin_one_scores_exactly_the_per_tensor_grid():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 6)).astype(np.float32) * np.array([1, 1, 1, 20, 20, 20], np.float32)
    low, high = rows.min(axis=0), rows.max(axis=0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = score_grids(rows, low, high, labels, (0.0, 1.0), QuantSpec(bits=8))
    assert scores.free[1] == pytest.approx(scores.tensor_error, rel=1e-9)
    # On its own fit data nothing clips: the large channels' group is the tensor range (same error),
    # the small channels get their own finer step, so margin 0 wins by exactly their error change.
    spec = QuantSpec(bits=8)
    scale, zero = scale_zero_point(low.min(), high.max(), spec)
    big = grid_error(rows[:, 3:], scale, zero.astype(np.float32), 255)
    small_s, small_z = scale_zero_point(low[:3].min(), high[:3].max(), spec)
    small = grid_error(rows[:, :3], small_s, small_z.astype(np.float32), 255)
    assert scores.free[0] == pytest.approx(big + small, rel=1e-9)
    assert scores.gain_db() == pytest.approx(10 * np.log10(scores.tensor_error / min(scores.free[0], scores.shared[0])),
                                             rel=1e-6)
    assert scores.gain_db() > 3


def test_choice_prefers_a_shared_zero_point_unless_free_ones_buy_the_threshold():
    scores = GridScores((0.0, 0.5), tensor_error=100.0, free=(10.0, 20.0), shared=(50.0, 12.0))
    assert scores.choose(1.0) == (0.5, True)  # free 10 vs shared 12: 0.8 dB, not worth an Add
    assert scores.choose(0.5) == (0.0, False)  # now it is
    assert scores.choose(10.0) is None  # the best (10) beats per-tensor by exactly 10 dB; 12 by less
    assert GridScores((0.0,), 100.0, (90.0,), (95.0,)).choose(1.0) is None


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_shared_zero_point_holds_every_group_range_with_one_code_for_zero(seed):
    rng = np.random.default_rng(seed)
    low = -rng.uniform(0, 5, 6) * rng.integers(0, 2, 6)
    high = rng.uniform(0.01, 50, 6)
    spec = QuantSpec(bits=8)
    sigma, z = shared_zero_point(low, high, spec)
    own, _ = scale_zero_point(low, high, spec)
    assert 0 <= z <= 255 and np.all(sigma >= own * (1 - 1e-6))
    # Every range fits on its grid around z (to float rounding): nothing calibrated is clipped.
    assert np.all(np.rint(high / sigma) + z <= 255 + 1e-6) and np.all(np.rint(low / sigma) + z >= -1e-6)


def test_channel_weights_weigh_each_channels_error():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((32, 4)).astype(np.float32)
    scale, zero = scale_zero_point(-1.0, 1.0, QuantSpec(bits=4))  # clips the tails: large errors too
    per_channel = [grid_error(rows[:, [c]], scale, zero.astype(np.float32), 15) for c in range(4)]
    weights = np.array([0.0, 1.0, 2.0, 10.0])
    assert grid_error(rows, scale, zero.astype(np.float32), 15, weights) == pytest.approx(
        float(np.dot(per_channel, weights)), rel=1e-9)


def test_a_weight_error_term_makes_groups_pay_for_the_weight_precision_they_cost():
    """score_grids with ``weight_error``: the per-tensor grid is scored at r ≡ 1, grouped grids at
    r = s_c/max s; a penalty growing as 1/r turns a clear group win into per-tensor."""
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((256, 8)).astype(np.float32) * np.array([1] * 4 + [30] * 4, np.float32)
    low, high = rows.min(axis=0), rows.max(axis=0)
    labels = np.array([0] * 4 + [1] * 4)
    spec = QuantSpec(bits=8)
    seen = []

    def zero(ratio):
        seen.append(np.array(ratio))
        return np.zeros_like(ratio)

    plain = score_grids(rows, low, high, labels, (0.0,), spec)
    free = score_grids(rows, low, high, labels, (0.0,), spec, weight_error=zero)
    assert (free.tensor_error, free.free, free.shared) == (plain.tensor_error, plain.free, plain.shared)
    np.testing.assert_array_equal(seen[0], np.ones(8))  # the per-tensor grid: every r = 1
    assert seen[1][:4].max() < 0.1 and np.all(seen[1][4:] == 1.0)  # the narrow group's r ≈ 1/30
    assert plain.choose(1.0) == (0.0, True)
    costly = score_grids(rows, low, high, labels, (0.0,), spec, weight_error=lambda r: 1e-3 / r)
    assert costly.choose(1.0) is None
