"""PTQD's variance schedule calibration on the sampler side: less sampler noise where quantization adds some.

The ``ptqd`` pass records, per calibrated timestep, the variance of the residual quantization noise
left in the corrected output, ε̃ = ε + Δ′/(1 + k_t) (``qcompile.ptqd`` in the model's metadata; the
same dict can sit in a scheduler config JSON under ``"ptqd"``). With classifier-free guidance
ε_g = ε_u + w(ε_c − ε_u), the residual's variance is
    v_t = (1 − w)²·v_u + w²·v_c + 2w(1 − w)·c_uc          (v = the pooled variance when unpaired)
DDIM's update (Song et al. 2021) with x̂₀ = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t,
    x_{t−1} = √ᾱ_{t−1}·x̂₀ + √(1 − ᾱ_{t−1} − σ_t²)·ε + σ_t·z,    σ_t = η·√((1 − ᾱ_{t−1})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t−1}))
carries ε with the coefficient a_t = √(1 − ᾱ_{t−1} − σ_t²) − √ᾱ_{t−1}·√(1 − ᾱ_t)/√ᾱ_t, so the residual adds
a_t²·v_t of variance to x_{t−1}; the sampler draws σ′_t·z with σ′_t² = max(σ_t² − a_t²·v_t, 0) instead
(the deterministic part, with σ_t, is diffusers' unchanged). η = 1 is DDPM's posterior variance.
With η = 0 there is no noise to take the residual from: only the output correction applies.
"""

from __future__ import annotations

import json

import numpy as np

METADATA_KEY = "qcompile.ptqd"


def read_metadata(session) -> dict | None:
    """The ``qcompile.ptqd`` estimates of an ORT session's model, or None."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return json.loads(text) if text else None


def scheduler_config_with(scheduler_config: dict, estimates: dict) -> dict:
    """A scheduler config (diffusers JSON) that also carries the PTQD estimates under ``"ptqd"``."""
    return {**scheduler_config, "ptqd": estimates}


def residual_variance(estimates: dict, t: float, guidance_scale: float | None) -> float:
    """v_t of the guided prediction (module docstring), linear in t between calibrated timesteps."""
    timesteps = np.asarray(estimates["timesteps"], float)

    def at(key: str) -> float:
        return float(np.interp(t, timesteps, np.asarray(estimates[key], float)))

    if guidance_scale is None or "residual_variance_uncond" not in estimates:
        return max(at("residual_variance"), 0.0)
    w = guidance_scale
    v = (1 - w) ** 2 * at("residual_variance_uncond") + w ** 2 * at("residual_variance_cond") \
        + 2 * w * (1 - w) * at("residual_covariance")
    return max(v, 0.0)


def noise_ratio(scheduler, t: int, eta: float, variance: float) -> tuple[float, float, float]:
    """(σ′_t/σ_t, σ_t, a_t) for diffusers' DDIMScheduler at timestep t (after ``set_timesteps``)."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    sigma2 = eta ** 2 * (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    a_t = np.sqrt(max(1 - alpha_prev - sigma2, 0.0)) - np.sqrt(alpha_prev) * np.sqrt(1 - alpha_t) / np.sqrt(alpha_t)
    if sigma2 <= 0:
        return 1.0, 0.0, float(a_t)
    return float(np.sqrt(max(sigma2 - a_t ** 2 * variance, 0.0) / sigma2)), float(np.sqrt(sigma2)), float(a_t)
