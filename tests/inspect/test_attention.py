"""Attention mass per key and on the start token, on a tiny cross-attention graph, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from qcompiler.inspect import InspectConfig, inspect_model
from qcompiler.inspect.attention import AttentionMass
from tests import graphs
from tests.inspect import builders

FRACTION = 0.1


@pytest.fixture(scope="module")
def case():
    model = graphs.attention_model(d=8, tokens=4, context_tokens=5, cross=True)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    feeds = builders.cross_attention_feeds(weights)
    report = inspect_model(model, feeds, InspectConfig(progress=False, attention_fraction=FRACTION)).report
    return report, weights, feeds


def numpy_mass(weights, feeds) -> np.ndarray:
    """Â_j = Σ_i A[i, j] per sample (one head), softmax(q·kᵀ·scale) in float64."""
    masses = []
    for feed in feeds:
        q = feed["x"].astype(np.float64) @ weights["Wq"]
        k = feed["ctx"].astype(np.float64) @ weights["Wk"]
        scores = q @ k.transpose(0, 2, 1) * float(weights["scale"])
        probabilities = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        masses.append(probabilities.sum(axis=1))
    return np.concatenate(masses)


def test_start_token_mass_matches_numpy(case):
    report, weights, feeds = case
    (site,) = report["attention"]
    mass = numpy_mass(weights, feeds)
    queries = feeds[0]["x"].shape[1]
    share = mass[:, 0] / queries
    assert site["kind"] == "cross" and site["samples"] == len(mass) and site["keys"] == mass.shape[1]
    # ORT's float32 softmax against float64: ~1e-7 relative per probability, summed over 4 queries.
    assert site["start_token_mass"]["mean"] == pytest.approx(share.mean(), rel=1e-5)
    assert site["start_token_mass"]["max"] == pytest.approx(share.max(), rel=1e-5)
    np.testing.assert_allclose(site["mean_mass"], mass.mean(axis=0), rtol=1e-5)


def test_outlier_keys_match_numpy_and_the_start_token_is_the_sink(case):
    report, weights, feeds = case
    (site,) = report["attention"]
    mass = numpy_mass(weights, feeds)
    threshold = FRACTION * feeds[0]["x"].shape[1]
    # Precondition: no key within float32 noise of the threshold, so the comparison is exact.
    assert np.abs(mass - threshold).min() > 1e-4
    counts = (mass >= threshold).sum(axis=0)
    assert dict(map(tuple, site["outlier_keys"])) == {k: int(c) for k, c in enumerate(counts) if c}
    # The feeds point context token 0 along the queries' mean key direction (builders): a sink.
    assert 0 in site["sink_positions"]


def test_token_ids_are_counted_for_self_attention_only():
    probabilities = np.zeros((1, 2, 3, 3))
    probabilities[..., 1] = 1.0  # every query of every head attends to key 1: Â = (0, 3, 0)
    ids = np.array([[5, 6, 7]])
    self_mass, cross_mass = AttentionMass("p", "self"), AttentionMass("p", "cross")
    self_mass.update(probabilities, ids)
    cross_mass.update(probabilities, ids)
    assert dict(self_mass.by_token) == {6: 1} and not cross_mass.by_token
    np.testing.assert_array_equal(self_mass.mass, [0.0, 3.0, 0.0])
    assert self_mass.start_share_sum == 0.0
