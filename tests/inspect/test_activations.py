"""Activation outliers and the DGQ view, on a hand-built graph with an injected outlier channel."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.calibration.statistics import TensorStats
from qcompiler.inspect import InspectConfig, inspect_model
from qcompiler.inspect.activations import OutlierCounts, dgq_view
from tests.inspect import builders

QUIET = InspectConfig(progress=False)
TAU = QUIET.tau


@pytest.fixture(scope="module")
def inspected():
    feeds = builders.residual_feeds()
    result = inspect_model(builders.residual_model(), feeds, QUIET)
    return result.report, builders.reference_activations(feeds)


def numpy_outliers(h: np.ndarray, tau: float):
    """Counts of |h| > τ·mean|h| per channel and per token, and max/mean, over all samples at once."""
    magnitude = np.abs(h)
    outlier = magnitude > tau * magnitude.mean()
    return outlier.sum(axis=(0, 1)), outlier.sum(axis=(0, 2)), magnitude.max() / magnitude.mean()


def as_pairs(counts: np.ndarray) -> list[list[int]]:
    hits = np.flatnonzero(counts)
    return [[int(i), int(counts[i])] for i in hits[np.lexsort((hits, -counts[hits]))]]


def test_watches_the_linear_inputs_and_the_residual_sum(inspected):
    report, _ = inspected
    roles = {row["tensor"]: row["roles"] for row in report["activations"]}
    # h1 is only a Linear output feeding the Add: not watched on its own.
    assert roles == {"x": ["gemm_input"], "s": ["gemm_input", "residual_sum"]}


def test_injected_channel_is_named_and_counts_match_numpy(inspected):
    report, reference = inspected
    rows = {row["tensor"]: row for row in report["activations"]}
    samples = sum(len(f["x"]) for f in builders.residual_feeds())
    for name in ("x", "s"):
        by_channel, by_token, ratio = numpy_outliers(reference[name], TAU)
        outliers = rows[name]["outliers"]
        assert outliers["channels"] == as_pairs(by_channel)
        assert outliers["positions"] == as_pairs(by_token)
        # Known answer: one outlier per sample, at token 0 of the injected channel
        # (512 and 2·512 against thresholds of a few hundred; every other |value| ≤ 8).
        assert outliers["channels"] == [[builders.OUTLIER_CHANNEL, samples]]
        assert outliers["positions"] == [[0, samples]]
        # Same float64 sum of exact values in another order: equal to a few ulps.
        assert rows[name]["max_mean_ratio"] == pytest.approx(ratio, rel=1e-12)
        assert rows[name]["threshold"] == pytest.approx(TAU * np.abs(reference[name]).mean(), rel=1e-12)
    assert report["passes_agree"]


def test_the_recurring_channel_is_systematic(inspected):
    report, _ = inspected
    found = [(item["width"], item["channel"], item["tensors"]) for item in report["systematic_channels"]]
    assert found == [(builders.CHANNELS, builders.OUTLIER_CHANNEL, 2)]  # in both x and s


def test_top_channel_and_per_channel_absmax(inspected):
    report, reference = inspected
    row = next(r for r in report["activations"] if r["tensor"] == "s")
    np.testing.assert_array_equal(row["channel_absmax"], np.abs(reference["s"]).max(axis=(0, 1)))
    assert row["top_channels"][0]["channel"] == builders.OUTLIER_CHANNEL


def test_counts_by_token_id_and_energy():
    values = np.zeros((2, 3, 2), np.float32)
    values[0, 1, 0], values[1, 2, 1], values[1, 0, 0] = 10.0, -10.0, 3.0
    stats = TensorStats.start("t", values, -1, 16, per_index=True)
    stats.update(values, "batch")
    counts = OutlierCounts.start(stats, threshold=5.0)
    counts.update(values, token_ids=np.array([[7, 8, 9], [7, 9, 9]]))
    assert dict(counts.by_token) == {8: 1, 9: 1}  # the tokens at (0, 1) and (1, 2); 3.0 is below 5
    np.testing.assert_array_equal(counts.by_channel, [1, 1])
    np.testing.assert_array_equal(counts.by_position, [0, 1, 1])
    np.testing.assert_array_equal(counts.energy_channel, (values.astype(np.float64) ** 2).sum(axis=(0, 1)))
    np.testing.assert_array_equal(counts.energy_position, (values.astype(np.float64) ** 2).sum(axis=(0, 2)))


def stats_of(values: np.ndarray) -> TensorStats:
    stats = TensorStats.start("t", values, -1, 16, per_index=True)
    stats.update(values, "constructed")
    return stats


def test_dgq_picks_the_channel_axis_for_a_wide_channel():
    # Channel 0 spans ±10 at every token, the others ±1: per channel max = [10, 1, 1], min = [-10, -1, -1],
    # so D_channel = (10 - 1) + (-1 - -10) = 18; every token has max 10 and min -10, so D_pixel = 0.
    values = np.ones((2, 4, 3), np.float32)
    values[:, :, 0] = 10.0
    values[1] *= -1
    view = dgq_view(stats_of(values))
    assert (view["D_channel"], view["D_pixel"], view["axis"]) == (18.0, 0.0, "channel")


def test_dgq_picks_the_pixel_axis_for_a_wide_token():
    # Token 2 spans ±10 in every channel, the others ±1: D_pixel = 18 by the same sums, D_channel = 0.
    values = np.ones((2, 4, 3), np.float32)
    values[:, 2, :] = 10.0
    values[1] *= -1
    view = dgq_view(stats_of(values))
    assert (view["D_channel"], view["D_pixel"], view["axis"]) == (0.0, 18.0, "pixel")


def test_dgq_spread_is_the_design_formula_on_random_data():
    values = np.random.default_rng(3).standard_normal((5, 7, 6)).astype(np.float32) * np.arange(1, 7)
    high_c, low_c = values.max(axis=(0, 1)), values.min(axis=(0, 1))
    high_p, low_p = values.max(axis=(0, 2)), values.min(axis=(0, 2))
    view = dgq_view(stats_of(values))
    assert view["D_channel"] == pytest.approx(float(np.ptp(high_c) + np.ptp(low_c)), rel=1e-12)
    assert view["D_pixel"] == pytest.approx(float(np.ptp(high_p) + np.ptp(low_p)), rel=1e-12)
