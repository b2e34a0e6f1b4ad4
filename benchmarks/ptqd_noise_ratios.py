"""PTQD's variance schedule on a compiled ``--ptqd`` model: σ′_t/σ_t per sampler step (DDIM, η = 1).

Reads the ``qcompile.ptqd`` estimates from the model's metadata and, for the zoo sampler's schedule
(``config_for`` of the float denoiser), prints per timestep σ′_t/σ_t = sqrt(max(σ_t² − a_t²·v_t, 0))/σ_t
with v_t the guided residual variance (``qcompiler.diffusion.ptqd``), and a_t²·v_t/σ_t² for the last
steps (> 1: the sampler's noise is clamped to 0 there). Used for the PTQD reading in
``results/tdq_ptqd.md``.

Usage: python benchmarks/ptqd_noise_ratios.py PTQD_MODEL FLOAT_DENOISER [PTQD_MODEL FLOAT_DENOISER ...]
       [--steps 25] [--guidance 4]
"""

from __future__ import annotations

import argparse
import json

import onnx


def main(argv=None) -> int:
    from qcompiler.diffusion.ptqd import METADATA_KEY, noise_ratio, residual_variance
    from qcompiler.diffusion.sampler import config_for

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="PTQD model, float denoiser, ...")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    for path, source in zip(args.pairs[::2], args.pairs[1::2]):
        model = onnx.load(path, load_external_data=False)
        estimates = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
        scheduler = config_for(source, steps=args.steps, guidance_scale=args.guidance, eta=1.0).scheduler()
        rows = []
        for t in scheduler.timesteps.tolist():
            v = residual_variance(estimates, t, args.guidance)
            ratio, sigma, a = noise_ratio(scheduler, int(t), 1.0, v)
            rows.append((int(t), ratio, a * a * v / (sigma * sigma)))
        print(path)
        print("  σ′/σ: " + " ".join(f"t={t}:{r:.3f}" for t, r, _ in rows))
        print("  a²v/σ² (last 3 steps): " + " ".join(f"t={t}:{q:.3g}" for t, _, q in rows[-3:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
