"""Image metrics for diffusion evaluation: PSNR, SSIM, classifier accuracy and Fréchet distance.

Images are float arrays (N, 1, H, W) in [-1, 1], the sampler's output range; PSNR and SSIM
use that range (``data_range = 2``).

- PSNR = 10·log10(data_range² / MSE), +inf for identical images.
- SSIM: scikit-image's ``structural_similarity`` (Wang et al. 2004: 7x7 uniform window,
  K1 = 0.01, K2 = 0.03), averaged over images; 1 for identical images.
- Accuracy: the share of images whose classifier arg-max equals the prompted digit.
- Fréchet distance between two feature sets with means μ₁, μ₂ and covariances Σ₁, Σ₂
  (FID's formula, here in the MNIST classifier's penultimate feature space):
  ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)``.
- Kernel distance (KID, Bińkowski et al. 2018): the unbiased MMD² between two feature sets with the
  cubic polynomial kernel k(x, y) = (x·y/D + 1)³. Unlike the Fréchet distance it has no bias that
  depends on the sample size, so it can compare small sets (tens to a few hundred images).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DATA_RANGE = 2.0  # images live in [-1, 1]


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """PSNR in dB of ``test`` against ``reference`` over all pixels; inf when they are equal."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(test, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def psnr_per_image(reference: np.ndarray, test: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    return np.array([psnr(r, t, data_range) for r, t in zip(reference, test)])


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM over a batch (N, C, H, W) or (N, H, W); colour images average SSIM over channels."""
    from skimage.metrics import structural_similarity

    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    if reference.ndim == 4 and reference.shape[1] == 1:
        reference, test = reference[:, 0], test[:, 0]
    channel_axis = 0 if reference.ndim == 4 else None
    return float(np.mean([structural_similarity(r, t, data_range=data_range, channel_axis=channel_axis)
                          for r, t in zip(reference, test)]))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2·(ΣaΣb)^½) of two (N, D) feature sets (rows are samples).

    tr((ΣaΣb)^½) is computed as Σ sqrt(λᵢ) of the symmetric PSD matrix Σa^½·Σb·Σa^½, which has
    the same eigenvalues as ΣaΣb; unlike ``scipy.linalg.sqrtm`` of the product this stays real
    and stable when a covariance is singular (dead ReLU features, fewer samples than D).
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, scale: float = 1.0) -> float:
    """Unbiased MMD² of two (N, D) feature sets with k(x, y) = (x·y/D + 1)³ (KID's kernel).

    mean_{i≠j} k(aᵢ, aⱼ) + mean_{i≠j} k(bᵢ, bⱼ) − 2·mean_{i,j} k(aᵢ, bⱼ): its expectation is 0 when
    both sets come from one distribution, whatever their sizes, so single values may be negative.
    Features are divided by ``scale`` first: KID's kernel assumes entries of order 1 (Inception's
    pooled features); pass one fixed scale (e.g. a reference set's RMS entry) for features in other
    units, the same for every comparison that is ranked.
    """
    a, b = np.asarray(features_a, np.float64) / scale, np.asarray(features_b, np.float64) / scale
    dim = a.shape[1]

    def kernel(x, y):
        return (x @ y.T / dim + 1.0) ** 3

    def within(x):
        k = kernel(x, x)
        return (k.sum() - np.trace(k)) / (len(x) * (len(x) - 1))

    return float(within(a) + within(b) - 2 * kernel(a, b).mean())


class Classifier:
    """An image classifier ONNX under ORT: ``pixels`` (N, C, H, W) in [-1, 1] -> ``logits``, ``features``.

    The zoo's is ``models/mnist_classifier.onnx``; a float denoiser's JSON names its own
    (``classifier``, relative to the JSON; ``for_denoiser``).
    """

    def __init__(self, path: str | os.PathLike):
        from qcompiler.runtimes.ort import make_session

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"classifier {self.path} is missing")
        self.session = make_session(self.path)

    @classmethod
    def for_denoiser(cls, denoiser_path: str | os.PathLike) -> Classifier:
        """The classifier named by ``<denoiser>.json``'s ``classifier``; FileNotFoundError when it names none."""
        from qcompiler.diffusion.sampler import model_metadata

        name = model_metadata(denoiser_path).get("classifier")
        if name is None:
            raise FileNotFoundError(f"{Path(denoiser_path).with_suffix('.json')}: names no 'classifier' for the "
                                    "accuracy and Fréchet figures; pass --classifier ONNX")
        return cls(Path(denoiser_path).parent / name)

    def __call__(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, 10), penultimate features (N, D)) of ``images``, in batches."""
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            out = self.session.run(["logits", "features"],
                                   {"pixels": np.ascontiguousarray(images[start:start + batch_size], np.float32)})
            logits.append(out[0])
            features.append(out[1])
        return np.concatenate(logits), np.concatenate(features)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max is the label."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
