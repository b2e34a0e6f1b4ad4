"""How well qdit's search proxy ranks group-size configurations, against final-image quality on the zoo DiT.

The proxy (``passes/qdit_groups.py``) is Σ_l of each layer's relative output error on sampled calibration
rows; Q-DiT's own fitness is FID on 800 samples. Here: the proxy's error table is computed once, a pool of
valid configurations is drawn (the search's final population, the valid uniform ones and random valid
ones), ``--candidates`` of them are taken at evenly spaced proxy ranks (the best included), and each is
compiled (``--set qdit_groups.sizes=[…]``) and samples ``--samples`` images from the same seeds as the
float model. Reported: proxy, Fréchet distance and kernel distance (KID: unbiased MMD², no sample-size
bias) of classifier features to the float samples' and to real held-out digits, PSNR vs float, and the
Spearman ρ of the proxy against each. Each distance's noise floor is reported beside it: its value
between the float samples and a second float set from other seeds (same prompts), which a candidate's
distance must clear before its rank means anything. The search's wall time (error table + evolution)
is reported too.

Writes ``<name>.json`` and ``<name>.md`` to ``--out``.

Usage: python benchmarks/qdit_proxy.py [--setting w4a8] [--candidates 10] [--samples 24] [--work build/qdit_proxy]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import models_dir  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="w4a8")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--calib-limit", type=int, default=None,
                        help="calibration samples for the candidates' compiles (only the patch Conv's static range "
                             "needs them; the same for every candidate)")
    parser.add_argument("--lowering", default="simulate", choices=("integer", "simulate"),
                        help="the candidates' ORT lowering (--dynamic-groups): simulate computes the same numbers "
                             "as integer to float rounding, about twice as fast on ORT's CPU at these widths")
    parser.add_argument("--calib", type=Path, default=Path("build/bench_dit/dit/dit_mnist.calib"))
    parser.add_argument("--work", type=Path, default=Path("build/qdit_proxy"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="qdit_proxy", help="the results' file stem")
    return parser.parse_args(argv)


def candidate_pool(errors: np.ndarray, config, count: int, seed: int = 1) -> list[np.ndarray]:
    """``count`` valid configurations at evenly spaced ranks of the proxy, from a pool around the search."""
    from qcompiler.passes.qdit_groups import PAPER_SIZES, evolve

    layers, choices = errors.shape
    sizes = np.array(PAPER_SIZES, float)
    best, population = evolve(errors, config.budget, config)
    rng = np.random.default_rng(seed)
    pool = list(population) + [np.full(layers, c) for c in range(choices) if sizes[c] >= config.budget]
    while len(pool) < 300:
        candidate = rng.integers(0, choices, layers)
        if sizes[candidate].mean() >= config.budget:
            pool.append(candidate)
    unique = {tuple(int(c) for c in p): p for p in pool}
    ranked = sorted(unique.values(), key=lambda c: float(errors[np.arange(layers), c].sum()))
    picks = np.unique(np.linspace(0, len(ranked) - 1, count).round().astype(int))
    return [ranked[i] for i in picks]


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    import qcompiler
    from qcompiler.api import CompileOptions
    from qcompiler.calibration.readers import load_calibration
    from qcompiler.context import CompileContext, QuantSettings
    from qcompiler.diffusion import metrics
    from qcompiler.diffusion.evaluate import cached_sample_model, quality, real_heldout_features, sample_model
    from qcompiler.diffusion.sampler import config_for
    from qcompiler.graph import load_model
    from qcompiler.passes.qdit_groups import PAPER_SIZES, QditGroupsConfig, error_table, evolve, linear_units
    from qcompiler.recipes import get_recipe

    args = parse_args(argv)
    wbits, abits = int(args.setting[1]), int(args.setting[3])
    model_path = models_dir() / "dit_mnist.onnx"
    args.work.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path)
    ctx = CompileContext(model, QuantSettings(wbits=wbits, abits=abits), load_calibration(args.calib, model))
    config = QditGroupsConfig()
    timing = args.work / f"search_{args.setting}.json"
    if timing.exists():  # a resumed run: the error table (deterministic on the same calibration) from the first
        saved = json.loads(timing.read_text())
        errors, table_s, search_s = np.array(saved["errors"]), saved["error_table_s"], saved["search_s"]
    else:
        started = time.perf_counter()
        groups, units, candidates, _ = linear_units(ctx.graph)
        errors = error_table(ctx, groups, units, candidates, config)
        table_s = time.perf_counter() - started
        evolve(errors, config.budget, config)
        search_s = time.perf_counter() - started
        timing.write_text(json.dumps({"errors": errors.tolist(), "error_table_s": table_s, "search_s": search_s}))
    picks = candidate_pool(errors, config, args.candidates)

    sampler_config = config_for(model_path, steps=25, guidance_scale=4.0)
    classifier = metrics.Classifier.for_denoiser(model_path)
    real = real_heldout_features(classifier)
    float_images, labels = cached_sample_model(model_path, args.samples, sampler_config, 0, args.work / "float")
    float_features = classifier(float_images)[1]
    # The noise floor: the same prompts from seeds the candidates never use.
    second_images, _ = cached_sample_model(model_path, args.samples, sampler_config, args.samples, args.work / "float")
    second_features = classifier(second_images)[1]
    unit = float(np.sqrt(np.mean(float_features ** 2)))  # one scale for every KID below (see kernel_distance)

    def kid(a, b):
        return metrics.kernel_distance(a, b, unit)

    floor = {"frechet_float_vs_float": metrics.frechet_distance(second_features, float_features),
             "kid_float_vs_float": kid(second_features, float_features),
             "frechet_real_of_float": metrics.frechet_distance(float_features, real),
             "kid_real_of_float": kid(float_features, real)}
    rows_path = args.work / f"rows_{args.setting}.s{args.samples}.json"
    done = {json.dumps(r["sizes"]): r for r in json.loads(rows_path.read_text())} if rows_path.exists() else {}
    rows = []
    for index, choice in enumerate(picks):
        sizes = [PAPER_SIZES[c] for c in choice]
        if json.dumps(sizes) in done:  # measured by an earlier, interrupted run (same sizes, samples, seeds)
            rows.append({**done[json.dumps(sizes)], "candidate": index})
            continue
        recipe = get_recipe("qdit").with_settings({"qdit_groups": {"sizes": tuple(sizes)}})
        out = args.work / f"candidate{index}.onnx"
        qcompiler.quantize(str(model_path), recipe, str(args.calib), out,
                           CompileOptions(wbits=wbits, abits=abits, progress=False, dynamic_groups=args.lowering,
                                          calib_limit=args.calib_limit))
        images, _ = sample_model(out, args.samples, sampler_config, text_source=model_path)
        scored = quality(images, labels, classifier, real)
        rows.append({"candidate": index, "proxy": float(errors[np.arange(len(choice)), choice].sum()),
                     "mean_size": float(np.mean(sizes)), "sizes": sizes,
                     "frechet_vs_float": metrics.frechet_distance(scored["features"], float_features),
                     "frechet_real": scored["frechet"],
                     "kid_vs_float": kid(scored["features"], float_features),
                     "kid_real": kid(scored["features"], real),
                     "psnr_db": float(np.mean(metrics.psnr_per_image(float_images, images)))})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sizes"}), flush=True)
        rows_path.write_text(json.dumps(list({**done, **{json.dumps(r["sizes"]): r for r in rows}}.values())))
    proxy = [r["proxy"] for r in rows]

    def rho(key, sign=1.0):
        values = [sign * r[key] for r in rows if key in r]
        return float(spearmanr(proxy, values).statistic) if len(values) == len(rows) else None

    summary = {"setting": args.setting.upper(), "samples": args.samples, "candidates": len(rows),
               "error_table_s": table_s, "search_s": search_s, **floor,
               "spearman_proxy_vs_frechet_float": rho("frechet_vs_float"),
               "spearman_proxy_vs_frechet_real": rho("frechet_real"),
               "spearman_proxy_vs_kid_float": rho("kid_vs_float"),
               "spearman_proxy_vs_kid_real": rho("kid_real"),
               "spearman_proxy_vs_minus_psnr": rho("psnr_db", -1.0)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    lines = [f"# qdit: search proxy vs final-image quality (zoo DiT, {summary['setting']})", "",
             f"`{' '.join(sys.argv)}`. {len(rows)} valid configurations (mean paper-scale size ≥ 128) at evenly "
             f"spaced proxy ranks, lowered with `--dynamic-groups {args.lowering}`; {args.samples} images each (DDIM 25 steps, guidance 4, seeds 0..{args.samples - 1}). "
             f"Search wall time: error table {table_s:.1f} s + evolution = {search_s:.1f} s.", "",
             "| candidate | proxy Σ rel. error | mean size | Fréchet vs float | Fréchet (real) | KID vs float "
             "| KID (real) | PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['proxy']:.4g} | {r['mean_size']:.0f} | {r['frechet_vs_float']:.2f} "
              f"| {r['frechet_real']:.1f} | {_fmt(r.get('kid_vs_float'))} | {_fmt(r.get('kid_real'))} "
              f"| {r['psnr_db']:.2f} |" for r in rows]
    lines += [f"| float (noise floor: vs float seeds {args.samples}..{2 * args.samples - 1}) | – | – "
              f"| {floor['frechet_float_vs_float']:.2f} | {floor['frechet_real_of_float']:.1f} "
              f"| {_fmt(floor['kid_float_vs_float'])} | {_fmt(floor['kid_real_of_float'])} | – |"]
    lines += ["", "Spearman ρ of the proxy (1 = same order): " + "; ".join(
        f"against {label}: {_fmt(summary[key], '.2f')}" for label, key in (
            ("Fréchet vs float", "spearman_proxy_vs_frechet_float"),
            ("Fréchet to real digits", "spearman_proxy_vs_frechet_real"),
            ("KID vs float", "spearman_proxy_vs_kid_float"), ("KID to real digits", "spearman_proxy_vs_kid_real"),
            ("−PSNR", "spearman_proxy_vs_minus_psnr"))) + ".", ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    raise SystemExit(main())
