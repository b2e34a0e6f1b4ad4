"""TDQ and PTQD on the zoo's diffusion models: final-image quality vs float, with and without each method.

For each model (unet, dit), setting and base recipe (minmax, dgq) the rows are: the base; ``--tdq``
(the MLP tables); the base with PTQD (``passes.ptqd.apply_ptqd`` on the compiled base: the same pass
``--ptqd`` runs after lowering, without compiling twice); and ``dgq --per-timestep`` (the nearest
calibrated timestep's ranges). Every row samples the same prompts and seeds as the float model:
- DDIM 25 steps, η = 0 (the calibration's timesteps: 1, 41, …, 961);
- DDIM 15 steps, η = 0 (timesteps 1, 67, …, 925: all but t = 1 unseen by calibration);
- DDIM 25 steps, η = 1 for the PTQD rows and their bases (stochastic: the residual variance is
  taken out of the step noise; at η = 0 only the output correction acts).
Metrics (``qcompiler.diffusion``): PSNR/SSIM of the final images vs float, classifier accuracy, Fréchet
distance in classifier features to real held-out digits and to the float samples. Writes
``tdq_ptqd.json``/``tdq_ptqd.md``; compiled models and rows are cached in ``--work``.

Usage: python benchmarks/bench_tdq_ptqd.py [--models unet dit] [--settings w8a8 w4a8 w8a6] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import MODELS, calibration, compile_row, models_dir  # noqa: E402
from diffusion_rows import Row  # noqa: E402

#: Rows also sampled with η = 1: the PTQD rows and their bases.
STOCHASTIC_ROWS = ("minmax", "minmax+ptqd", "dgq", "dgq+ptqd")
SAMPLINGS = {"25 steps": (25, 0.0), "15 steps (unseen t)": (15, 0.0), "25 steps η=1": (25, 1.0)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "dit"], choices=sorted(MODELS))
    parser.add_argument("--settings", nargs="+", default=["w8a8", "w4a8", "w8a6"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("build/bench_tdq_ptqd"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rows", nargs="+", default=None, help="only these row labels (default: all)")
    parser.add_argument("--cached-only", action="store_true", help="write the tables from the rows already measured")
    return parser.parse_args(argv)


class Scorer:
    """Float images per sampling (cached), and the metrics of a quantized model's images against them."""

    def __init__(self, model: Path, samples: int, work: Path):
        from qcompiler.diffusion import metrics
        from qcompiler.diffusion.evaluate import real_heldout_features

        self.model, self.samples, self.work, self.metrics = model, samples, work, metrics
        self.classifier = metrics.Classifier.for_denoiser(model)
        self.real = real_heldout_features(self.classifier)
        self.floats: dict[str, tuple] = {}

    def config(self, sampling: str):
        from qcompiler.diffusion.sampler import config_for

        steps, eta = SAMPLINGS[sampling]
        return config_for(self.model, steps=steps, guidance_scale=4.0, eta=eta)

    def float_images(self, sampling: str):
        from qcompiler.diffusion.evaluate import cached_sample_model, quality

        if sampling not in self.floats:
            images, labels = cached_sample_model(self.model, self.samples, self.config(sampling), 0, self.work / "float")
            self.floats[sampling] = (images, labels, quality(images, labels, self.classifier, self.real))
        return self.floats[sampling]

    def score(self, path: Path, sampling: str) -> dict:
        from qcompiler.diffusion.evaluate import quality, sample_model

        float_images, labels, float_quality = self.float_images(sampling)
        images = sample_model(path, self.samples, self.config(sampling), 0, text_source=self.model)[0]
        q = quality(images, labels, self.classifier, self.real)
        m = self.metrics
        return {"psnr_db": float(np.mean(m.psnr_per_image(float_images, images))),
                "ssim": m.ssim(float_images, images), "accuracy": q["accuracy"], "frechet": q["frechet"],
                "frechet_vs_float": m.frechet_distance(q["features"], float_quality["features"]),
                "float_frechet": float_quality["frechet"]}


def rows_for(setting: str) -> list[tuple[str, Row, str | None]]:
    """(label, compiled row, base label for PTQD rows or None)."""
    w, a, one = int(setting[1]), int(setting[3]), ("--threads", "1")
    return [("minmax", Row("minmax", w, a, "", one), None), ("minmax+ptqd", Row("minmax", w, a, "", one), "ptqd"),
            ("minmax+tdq", Row("minmax", w, a, "tdq", ("--tdq", *one)), None),
            ("dgq", Row("dgq", w, a, "", one), None), ("dgq+ptqd", Row("dgq", w, a, "", one), "ptqd"),
            ("dgq+tdq", Row("dgq", w, a, "tdq", ("--tdq", *one)), None),
            ("dgq --per-timestep", Row("dgq", w, a, "per-timestep", ("--per-timestep", *one)), None),
            # The tdq/per-timestep rows leave Conv outputs float (no QLinearConv to requantize for):
            # minmax the same way separates that from the ranges.
            ("minmax, Conv outputs float", Row("minmax", w, a, "convout-float",
                                               ("--set", "insert_activation_qdq.quantize_conv_outputs=false", *one)), None)]


def ptqd_summary(estimates: dict) -> dict:
    k, v = np.array(estimates["k"]), np.array(estimates["residual_variance"])
    return {"k_min": float(k.min()), "k_max": float(k.max()), "k_mean": float(k.mean()),
            "residual_variance_min": float(v.min()), "residual_variance_max": float(v.max()),
            "k_by_t": dict(zip(map(int, estimates["timesteps"]), map(float, k))),
            "variance_by_t": dict(zip(map(int, estimates["timesteps"]), map(float, v)))}


def run_model(name: str, args) -> list[dict]:
    from qcompiler.passes.ptqd import apply_ptqd

    model = models_dir() / f"{MODELS[name]}.onnx"
    work = args.work / name
    (work / "rows").mkdir(parents=True, exist_ok=True)
    calib = calibration(MODELS[name], work) if not args.cached_only else None
    scorer = Scorer(model, args.samples, work) if not args.cached_only else None
    results = []
    for setting in args.settings:
        for label, row, derived in rows_for(setting):
            if args.rows is not None and label not in args.rows:
                continue
            cached = work / "rows" / f"{setting}.{label.replace(' ', '')}.s{args.samples}.json"
            if not cached.exists() and args.cached_only:
                continue
            if not cached.exists():
                print(f"[bench] {name} {setting} {label} ...", flush=True)
                try:
                    compiled = compile_row(row, model, calib, work)
                except RuntimeError as exc:
                    print(f"[bench] {name} {setting} {label} FAILED: {exc}", flush=True)
                    continue
                path, extra = Path(compiled["path"]), {}
                if derived == "ptqd":
                    target = path.with_name(path.stem + ".ptqd.onnx")
                    if not target.exists():
                        extra["ptqd"] = ptqd_summary(apply_ptqd(model, path, calib, target))
                    path = target
                counts = compiled["report"]["integer_kernels"]
                samplings = [s for s in SAMPLINGS if "η" not in s or label in STOCHASTIC_ROWS]
                result = {"model": name, "setting": setting.upper(), "row": label, "compile_s": compiled["wall_s"],
                          "integer_gemms": counts["integer_gemms"], "float_gemms": counts["float_gemms"],
                          **extra, **{s: scorer.score(path, s) for s in samplings}}
                cached.write_text(json.dumps(result))
            results.append(json.loads(cached.read_text()))
            report = work / f"{row.key()}.onnx.report.json"
            if "tdq" in label and report.exists():
                results[-1]["tdq_notes"] = [n for p in json.loads(report.read_text())["passes"] if p["name"] == "tdq"
                                            for n in p["notes"]]
            print(f"[bench] {name} {setting} {label}: " + ", ".join(
                f"{s} {results[-1][s]['psnr_db']:.2f} dB" for s in SAMPLINGS if s in results[-1]), flush=True)
    return results


def write_tables(results: list[dict], meta: dict, out: Path) -> None:
    lines = [f"# TDQ and PTQD on the zoo ({meta['date']})", "", f"`{meta['command']}`; {meta['samples']} images per "
             "row (seeds 0..N−1), guidance 4. PSNR/SSIM: final images vs the float model's from the same seeds; "
             "Fréchet: classifier features vs 500 real held-out digits (float's own in the header) / vs the float "
             "samples. 15 steps: timesteps 1, 67, …, 925, none but t = 1 in the 25-step calibration.", ""]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        floats = {s: rows[0][s]["float_frechet"] for s in SAMPLINGS if s in rows[0]}
        lines += [f"## {model}", "", "float Fréchet (real): " + ", ".join(f"{s}: {v:.1f}" for s, v in floats.items()), "",
                  "| setting | row | int / float GEMMs | 25 steps PSNR / SSIM / Fréchet (real, vs float) | "
                  "15 steps (unseen t) PSNR / SSIM / Fréchet | 25 steps η=1 PSNR / Fréchet (real, vs float) |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            cells = []
            for s in SAMPLINGS:
                if s not in r:
                    cells.append("–")
                    continue
                m = r[s]
                cells.append(f"{m['psnr_db']:.2f} / {m['ssim']:.4f} / {m['frechet']:.1f}, {m['frechet_vs_float']:.2f}"
                             if "η" not in s else f"{m['psnr_db']:.2f} / {m['frechet']:.1f}, {m['frechet_vs_float']:.2f}")
            lines.append(f"| {r['setting']} | {r['row']} | {r['integer_gemms']} / {r['float_gemms']} | "
                         + " | ".join(cells) + " |")
        ptqd = [r for r in rows if "ptqd" in r]
        if ptqd:
            lines += ["", "PTQD estimates (k_t = ⟨Δ, ε⟩/⟨ε, ε⟩ and the corrected residual variance, per calibrated t):", "",
                      "| setting | row | k_t min / mean / max | residual variance min / max |", "|---|---|---|---|"]
            for r in ptqd:
                p = r["ptqd"]
                lines.append(f"| {r['setting']} | {r['row']} | {p['k_min']:+.4f} / {p['k_mean']:+.4f} / {p['k_max']:+.4f} | "
                             f"{p['residual_variance_min']:.3g} / {p['residual_variance_max']:.3g} |")
        lines += tdq_lines(rows) + ptqd_by_t_lines(rows) + [""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tdq_ptqd.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    notes = out / "tdq_ptqd.notes.md"  # the hand-written reading of the measured rows, kept across runs
    (out / "tdq_ptqd.md").write_text("\n".join(lines) + "\n" + (notes.read_text() if notes.exists() else ""))


def tdq_lines(rows: list[dict]) -> list[str]:
    """TDQ against the lookup (dgq+tdq vs dgq --per-timestep) at calibrated and unseen timesteps, and its notes."""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by = {r["row"]: r for r in rows if r["setting"] == setting}
        for base, lookup in (("dgq+tdq", "dgq --per-timestep"), ("minmax+tdq", "minmax, Conv outputs float"),
                             ("minmax+tdq", "minmax"), ("dgq+tdq", "dgq")):
            if base in by and lookup in by:
                cells = [f"{s}: {by[base][s]['psnr_db']:.2f} vs {by[lookup][s]['psnr_db']:.2f} dB "
                         f"({by[base][s]['psnr_db'] - by[lookup][s]['psnr_db']:+.2f})"
                         for s in ("25 steps", "15 steps (unseen t)") if s in by[base] and s in by[lookup]]
                lines.append(f"- {setting} {base} vs {lookup}: " + "; ".join(cells))
        for label in ("minmax+tdq", "dgq+tdq"):
            for note in by.get(label, {}).get("tdq_notes", []):
                lines.append(f"- {setting} {label} (compile): {note}")
    return ["", "TDQ (final-image PSNR vs float; calibrated timesteps = 25 steps, unseen = 15 steps):", ""] + lines if lines else []


def ptqd_by_t_lines(rows: list[dict]) -> list[str]:
    """k_t and the corrected residual variance at every calibrated timestep, per PTQD row."""
    ptqd = [r for r in rows if "ptqd" in r]
    if not ptqd:
        return []
    steps = sorted({int(t) for r in ptqd for t in r["ptqd"]["k_by_t"]})
    steps = steps[:4] + steps[4::5] if len(steps) > 12 else steps  # the last steps, then a sparser spread
    lines = ["", "PTQD k_t / residual variance by timestep (a selection):", "",
             "| setting | row | " + " | ".join(f"t={t}" for t in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for r in ptqd:
        k, v = r["ptqd"]["k_by_t"], r["ptqd"]["variance_by_t"]
        lines.append(f"| {r['setting']} | {r['row']} | " + " | ".join(
            f"{k[str(t)] if str(t) in k else k[t]:+.4f} / {v[str(t)] if str(t) in v else v[t]:.2g}" for t in steps) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [r for name in args.models for r in run_model(name, args)]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
            "samples": args.samples}
    write_tables(results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
