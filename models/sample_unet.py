"""Measure a shipped denoiser's own quality (UNet or DiT): prompt accuracy and Fréchet distance, plus a grid.

Run ``python -m qcompiler.models.sample_unet --samples 200`` after ``train_unet`` exported
``unet_mnist.onnx``, or ``... --denoiser models/dit_mnist.onnx --guidance 4 2`` for the
class-conditional DiT (``train_dit``). It samples ``prompts_for(N, model)`` (every digit equally
often, the caption templates in turn) from seeds 0..N−1 with DDIM and classifier-free guidance
on ONNX Runtime, through the denoiser's conditioner (``qcompiler.diffusion.conditioning``: the
text encoder for the UNet, the prompted digit's label for the DiT), scores them with the
bundled MNIST classifier (accuracy for the prompted digit; Fréchet distance to the 500
held-out real digits in its feature space), writes ``<stem>.samples.png`` (10 columns = digits
0..9; one row per caption template for the UNet, per group of ten seeds for the DiT) and
records the figures under ``"quality"`` in ``<stem>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def measure(denoiser: Path, samples: int, steps: int, guidance_scales: list[float], grid: Path | None,
            cache: Path | None = None) -> dict:
    """``{guidance: {accuracy, frechet, per_digit_accuracy, seconds}}``; the grid shows the first scale."""
    from qcompiler.diffusion import metrics
    from qcompiler.diffusion.evaluate import cached_sample_model, quality, real_heldout_features, save_grid
    from qcompiler.diffusion.sampler import condition_input_of, config_for

    by_label = condition_input_of(denoiser) == "class_labels"   # the DiT: the template does not matter
    tag = f"sample {denoiser.stem}"

    classifier = metrics.Classifier.for_denoiser(denoiser)
    real = real_heldout_features(classifier)
    results = {}
    for index, scale in enumerate(guidance_scales):
        start = time.perf_counter()
        config = config_for(denoiser, steps=steps, guidance_scale=scale)
        images, labels = cached_sample_model(denoiser, samples, config, cache=cache)
        seconds = time.perf_counter() - start
        scores = quality(images, labels, classifier, real)
        predicted = classifier(images)[0].argmax(axis=1)
        results[str(scale)] = {
            "accuracy": scores["accuracy"], "frechet": scores["frechet"], "sampling_seconds": round(seconds, 1),
            "per_digit_accuracy": [float(np.mean(predicted[labels == d] == d)) for d in range(10)],
        }
        print(f"[{tag}] guidance {scale}: accuracy {scores['accuracy']:.3f}, "
              f"Fréchet {scores['frechet']:.3f} ({samples} images, {seconds:.0f} s)", flush=True)
        if index == 0 and grid is not None:
            rows = [images[r * 10:(r + 1) * 10] for r in range(min(8, samples // 10))]
            names = [f"seeds {10 * r}-{10 * r + 9}" if by_label else f"template {r}" for r in range(len(rows))]
            prompts = "labels 0..9" if by_label else "prompts 'digit 0..9' per template"
            save_grid(rows, grid, names, title=f"{denoiser.name}: {prompts}, {steps} DDIM steps, guidance {scale}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.models.sample_unet", description=__doc__.split("\n")[0])
    parser.add_argument("--denoiser", type=Path, default=HERE / "unet_mnist.onnx")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0, 1.0],
                        help="guidance scales to measure; the first one draws the grid (default 4 1)")
    parser.add_argument("--grid", type=Path, default=None, help="default: <denoiser stem>.samples.png")
    parser.add_argument("--no-record", action="store_true",
                        help="do not write the figures into <denoiser>.json (by default they are added to its "
                             "'quality' block, replacing the same guidance scales when samples and steps match)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder caching the images (shared with `qcompile eval-diffusion --cache`)")
    args = parser.parse_args(argv)
    grid = args.grid or args.denoiser.with_name(f"{args.denoiser.stem}.samples.png")
    results = measure(args.denoiser, args.samples, args.steps, args.guidance, grid, args.cache)
    record_path = args.denoiser.with_suffix(".json")
    if not args.no_record and record_path.exists():
        record = json.loads(record_path.read_text())
        previous = record.get("quality", {})
        if (previous.get("samples"), previous.get("steps")) == (args.samples, args.steps):
            results = {**previous["by_guidance_scale"], **results}   # same protocol: add or replace scales
        record["quality"] = {"samples": args.samples, "steps": args.steps, "seeds": f"0..{args.samples - 1}",
                             "classifier": "mnist_classifier.onnx", "real_reference": "mnist_classifier.heldout (500)",
                             "by_guidance_scale": results}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[sample {args.denoiser.stem}] wrote {grid}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
