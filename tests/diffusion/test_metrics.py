"""PSNR, SSIM and Fréchet distance on inputs whose answers follow from the formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qcompiler.diffusion import metrics


def _images(seed=0, n=4):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 1, 32, 32)).astype(np.float32)


def test_psnr_of_identical_images_is_infinite():
    images = _images()
    assert metrics.psnr(images, images) == math.inf
    assert np.all(np.isinf(metrics.psnr_per_image(images, images)))


def test_psnr_of_a_constant_offset():
    # A uniform error d gives MSE = d², so PSNR = 10·log10(range² / d²) = 20·log10(2 / 0.1) dB.
    images = _images()
    assert metrics.psnr(images, images + 0.1) == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-4)


def test_ssim_of_identical_images_is_one_and_of_noisy_ones_less():
    images = _images()
    assert metrics.ssim(images, images) == pytest.approx(1.0)
    noisy = images + np.random.default_rng(1).normal(0, 0.5, images.shape).astype(np.float32)
    assert metrics.ssim(images, noisy) < 0.9


def test_frechet_distance_of_a_set_to_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    # Zero up to round-off of the eigen-decompositions (trace terms of size ~16).
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shift_is_its_squared_norm():
    # Same covariance, so the trace term cancels: FD = ‖μa − μb‖² = 16 · 0.5² = 4.
    features = np.random.default_rng(0).normal(size=(300, 16))
    assert metrics.frechet_distance(features, features + 0.5) == pytest.approx(4.0, abs=1e-8)


def test_frechet_distance_matches_the_sqrtm_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(1.0, 2.0, size=(300, 8))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b)
                - 2 * np.trace(np.real(linalg.sqrtm(cov_a @ cov_b))))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_survives_singular_covariances():
    # Dead features (constant columns) make Σ singular; the result must stay real and ≥ 0.
    features = np.random.default_rng(0).normal(size=(50, 8))
    features[:, :3] = 0.0
    value = metrics.frechet_distance(features, features[::-1] * 1.5)
    assert np.isfinite(value) and value >= 0


def test_accuracy():
    logits = np.eye(10)[[1, 2, 3, 4]]
    assert metrics.accuracy(logits, np.array([1, 2, 0, 4])) == 0.75


def test_the_classifier_is_the_one_the_denoiser_json_names(tmp_path):
    import qcompiler.models

    bundled = Path(qcompiler.models.__file__).parent / "mnist_classifier.onnx"
    (tmp_path / "d.json").write_text(json.dumps({"classifier": str(bundled)}))
    assert metrics.Classifier.for_denoiser(tmp_path / "d.onnx").path == bundled
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"e\.json: names no 'classifier'"):
        metrics.Classifier.for_denoiser(tmp_path / "e.onnx")


def test_kernel_distance_is_unbiased_for_one_distribution_and_grows_with_a_shift():
    # Over 200 pairs of independent small sets from one Gaussian the unbiased MMD² averages 0 (its
    # standard error is ~1/sqrt(200) of one value's spread), while a 1σ shift gives a clearly positive value.
    rng = np.random.default_rng(0)
    same = [metrics.kernel_distance(rng.normal(size=(20, 8)), rng.normal(size=(30, 8))) for _ in range(200)]
    spread = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * spread
    shifted = metrics.kernel_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 1.0)
    assert shifted > 10 * np.std(same), shifted


def test_kernel_distance_matches_the_pairwise_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    k = lambda x, y: (x @ y / 3 + 1) ** 3  # noqa: E731
    within_a = np.mean([k(a[i], a[j]) for i in range(5) for j in range(5) if i != j])
    within_b = np.mean([k(b[i], b[j]) for i in range(4) for j in range(4) if i != j])
    across = np.mean([k(x, y) for x in a for y in b])
    assert metrics.kernel_distance(a, b) == pytest.approx(within_a + within_b - 2 * across, rel=1e-12)
