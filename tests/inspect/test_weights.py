"""Weight outliers per row and column, and their coincidence with activation-outlier channels."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.inspect import InspectConfig, inspect_model
from tests.inspect import builders


@pytest.fixture(scope="module")
def weights():
    report = inspect_model(builders.residual_model(), builders.residual_feeds(), InspectConfig(progress=False)).report
    return {row["node"]: row for row in report["weights"]}


def test_large_weight_is_an_outlier_on_the_activation_outlier_channel(weights):
    row = weights["fc2"]
    _, w2 = builders.residual_weights()
    out_in = np.abs(w2.T.astype(np.float64))  # MatMul [in, out] viewed as [out, in]
    # Row WEIGHT_ROW: 127 entries of 1 and one 200, mean (127 + 200)/128 ≈ 2.55, so 200 > 64·2.55 ≈ 163;
    # every other row is all ±1 (ratio 1).
    assert row["outliers"]["input_channels"] == [[builders.OUTLIER_CHANNEL, 1]]
    assert row["outliers"]["output_channels"] == [[builders.WEIGHT_ROW, 1]]
    assert row["row_ratio"] == {"max": pytest.approx(200 / (327 / 128), rel=1e-12), "channel": builders.WEIGHT_ROW}
    np.testing.assert_allclose(row["row_ratios"], out_in.max(axis=1) / out_in.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(row["column_ratios"], out_in.max(axis=0) / out_in.mean(axis=0), rtol=1e-12)
    # The same channel carries the activation outliers of s, the input of fc2 (seed 000: 100% agreement).
    assert [f["channel"] for f in row["flagged_input_channels"]] == [builders.OUTLIER_CHANNEL]
    assert row["flagged_input_channels"][0]["column_rank"] == 1
    assert row["input_agreement"] == {"weight_outlier_channels": 1, "activation_outlier_channels": 1, "shared": 1}
    assert row["flagged_output_channels"] == []  # no width-16 tensor is watched, so nothing is systematic there


def test_signed_permutation_has_one_outlier_per_row(weights):
    row = weights["fc1"]
    # One non-zero |w| = 1 per row of 128: mean 1/128, ratio 128 > τ = 64 in every row.
    assert row["outliers"]["total"] == builders.CHANNELS
    assert row["row_ratio"]["max"] == pytest.approx(builders.CHANNELS)
    assert [f["channel"] for f in row["flagged_input_channels"]] == [builders.OUTLIER_CHANNEL]
