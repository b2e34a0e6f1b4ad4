"""The SQNR model behind the advice, against simulated quantization with quant.py's reference."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.calibration.statistics import TensorStats
from qcompiler.inspect import recommend
from qcompiler.inspect.activations import OutlierCounts, summarize
from qcompiler.inspect.targets import Activation
from qcompiler.quant import QuantSpec, fake_quantize, sqnr_db

ACTIVATION = QuantSpec(bits=8)  # asymmetric per tensor, as minmax quantizes GEMM inputs
WEIGHT = QuantSpec(bits=8, symmetric=True, granularity="axis", axis=0)  # per output channel
#: The model assumes uniform rounding noise and uncorrelated channels; with independent Gaussian
#: channels both hold, and 32×64 weight rounding errors leave ~0.15 dB of sampling spread.
TOLERANCE_DB = 0.5


def measured(x: np.ndarray, w: np.ndarray, sigma: np.ndarray) -> float:
    """SQNR of (Q(X/σ))·(Q(σ·W)) against X·W, where W is MatMul's [in, out]."""
    reference = x.astype(np.float64) @ w
    xq = fake_quantize((x / sigma).astype(np.float32), ACTIVATION)
    wq = fake_quantize((w * sigma[:, None]).T.astype(np.float32), WEIGHT).T
    return sqnr_db(reference, xq.astype(np.float64) @ wq)


def prepared(x: np.ndarray, w: np.ndarray):
    stats = TensorStats.start("x", x, -1, 64, per_index=True)
    stats.update(x, "generated")
    counts = OutlierCounts.start(stats, 64 * stats.mean_abs())
    counts.update(x)
    out_in = w.T[:, :, None]
    consumers = recommend.Consumers(np.square(w, dtype=np.float64).sum(axis=1), np.abs(w).max(axis=1),
                                    ((np.abs(out_in).max(axis=2), 1),))
    return stats, counts, consumers


def gaussian_case(channel_scale: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 64, channel_scale.size)) * channel_scale).astype(np.float32)
    w = rng.standard_normal((channel_scale.size, 32)).astype(np.float32)
    return x, w


def test_per_tensor_prediction_matches_simulation():
    x, w = gaussian_case(np.ones(64))
    stats, counts, consumers = prepared(x, w)
    predicted = recommend.predict(stats, counts, consumers, abits=8, wbits=8, groups=8)["per_tensor"]
    assert predicted == pytest.approx(measured(x, w, np.ones(64)), abs=TOLERANCE_DB)


def test_smoothquant_prediction_matches_simulation_and_helps_channel_outliers():
    scale = np.geomspace(1, 50, 64)  # channel ranges spread over 50x: SmoothQuant's case
    x, w = gaussian_case(scale, seed=1)
    stats, counts, consumers = prepared(x, w)
    sqnr = recommend.predict(stats, counts, consumers, abits=8, wbits=8, groups=8)
    absmax = np.abs(x).max(axis=(0, 1))
    sigma = np.sqrt(absmax / np.abs(w).max(axis=1))  # docs/algorithms.md §5.1 with α = 0.5
    assert sqnr["smoothquant"] == pytest.approx(measured(x, w, sigma), abs=TOLERANCE_DB)
    assert sqnr["per_tensor"] == pytest.approx(measured(x, w, np.ones(64)), abs=TOLERANCE_DB)
    assert sqnr["smoothquant"] > sqnr["per_tensor"]


def advice(x, w):
    stats, counts, consumers = prepared(x, w)
    summary = summarize(Activation("x", "x", -1, ("gemm_input",), ("fc",)), stats, counts, 64.0)
    return recommend.recommend(summary, recommend.predict(stats, counts, consumers, 8, 8, 8), 8, 1.5)


def test_gaussian_input_needs_nothing_and_an_outlier_channel_does():
    # Gaussian: ≈ 38.9 dB activation-only (module docstring) less a little weight noise, above 29.9 dB.
    assert advice(*gaussian_case(np.ones(64)))["treatment"] == "none"
    scale = np.ones(64)
    scale[7] = 200.0  # one channel 200x wider: the per-tensor step is ~200x too coarse for the rest
    row = advice(*gaussian_case(scale, seed=2))
    assert row["treatment"] in ("equivalent_scaling", "groups")
    assert row["sqnr_db"]["per_tensor"] < row["target_db"]


def test_target_is_the_gaussian_sqnr_less_the_allowed_bits():
    # 10·log10(12·255²/100) = 38.93 dB at 8 bits; 1.5 bits at 6.02 dB/bit leave 29.90 dB.
    assert recommend.gaussian_sqnr_db(8) == pytest.approx(38.93, abs=0.01)
    assert advice(*gaussian_case(np.ones(64)))["target_db"] == pytest.approx(29.90, abs=0.01)


def test_recipe_follows_the_most_demanding_treatment():
    rows = [{"treatment": "none", "variant": None, "label": "a"},
            {"treatment": "equivalent_scaling", "variant": "osplus", "label": "b"}]
    assert recommend.suggest_recipe(rows, [], diffusion=False)["suggested"] == "osplus"
    assert recommend.suggest_recipe(rows, [], diffusion=True)["suggested"] == "dmq"
    rows.append({"treatment": "groups", "variant": "pixel", "label": "c"})
    assert recommend.suggest_recipe(rows, [], diffusion=False)["suggested"] == "dgq"
    only_none = [{"treatment": "none", "variant": None, "label": "a"}]
    assert recommend.suggest_recipe(only_none, [], diffusion=False)["suggested"] == "minmax"
