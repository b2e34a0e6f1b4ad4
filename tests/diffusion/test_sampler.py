"""The DDIM + guidance loop on ONNX Runtime: shapes, determinism per seed, and the guidance formula."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qcompiler.diffusion.sampler import OnnxDenoiser, config_for, sample
from qcompiler.diffusion.text import TextEncoder, prompts_for


def _setup(path, steps=2, batch_size=16):
    text = TextEncoder.for_denoiser(path)
    captions, _ = prompts_for(3, path)
    return OnnxDenoiser(path), text(captions), text.empty(), config_for(path, steps=steps, batch_size=batch_size)


def test_samples_have_the_image_shape_and_range(tiny_denoiser):
    denoiser, contexts, empty, config = _setup(tiny_denoiser)
    images = sample(denoiser, contexts, empty, [0, 1, 2], config)
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


def test_an_image_depends_on_its_seed_not_its_batch(tiny_denoiser):
    denoiser, contexts, empty, config = _setup(tiny_denoiser)
    together = sample(denoiser, contexts, empty, [0, 1, 2], config)
    one_by_one = sample(denoiser, contexts, empty, [0, 1, 2], replace(config, batch_size=1))
    # Same float32 graph on different batch sizes: only GEMM summation order may differ.
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)
    assert not np.allclose(together[0], together[1])


def test_guidance_is_a_no_op_when_both_halves_agree(tiny_denoiser):
    # ε = ε_u + w·(ε_c − ε_u) equals ε_c for any w when the unconditional context is the prompt's.
    denoiser, contexts, _, config = _setup(tiny_denoiser)
    runs = [sample(denoiser, contexts[:1], contexts[0], [0], replace(config, guidance_scale=w))
            for w in (1.0, 7.5)]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


def test_scheduler_comes_from_the_model_json(tiny_denoiser):
    config = config_for(tiny_denoiser, steps=5)
    assert config.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    # 'leading' spacing with offset 1: t_k = k·(T // n) + 1, from the largest down, T // 5 = 200.
    assert config.scheduler().timesteps.tolist() == [801, 601, 401, 201, 1]


def test_stochastic_ddim_draws_step_noise_per_seed_and_ptqd_shrinks_it(tiny_denoiser):
    """η = 1: the same seeds give the same images (float and quantized runs share z), a different
    trajectory from η = 0; a PTQD residual variance larger than every σ_t² removes the step noise
    (σ′_t = 0), which changes the images."""
    denoiser, contexts, empty, config = _setup(tiny_denoiser)
    stochastic = replace(config, eta=1.0)
    first, again = (sample(denoiser, contexts, empty, [0, 1, 2], stochastic) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, sample(denoiser, contexts, empty, [0, 1, 2], config))
    huge = {"timesteps": [0.0, 999.0], "k": [0.0, 0.0], "residual_variance": [1e9, 1e9]}
    denoiser.ptqd = huge
    no_noise = sample(denoiser, contexts, empty, [0, 1, 2], replace(stochastic, guidance_scale=1.0))
    denoiser.ptqd = None
    with_noise = sample(denoiser, contexts, empty, [0, 1, 2], replace(stochastic, guidance_scale=1.0))
    assert np.isfinite(no_noise).all() and not np.allclose(no_noise, with_noise)
