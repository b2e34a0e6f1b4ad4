"""Reproduce DGQ's observations (seed 002, docs/algorithms.md §5.4) on the trained text-to-image UNet (CPU).

Three measurements on ``models/unet_mnist.onnx`` and its timestep-tagged calibration folder
(25 DDIM timesteps × 32 rows: 16 unconditional, 16 conditional), from one streaming pass of the
statistics engine (``stream_tensors`` + ``TensorStats`` with per-index min/max and the |x|
histogram) over every input X of a Linear/Conv with a constant weight (the GEMMs a recipe
quantizes; ``inspect.targets`` role ``gemm_input``) and every cross-attention Softmax output:

1. **Outliers vs random values.** Per tensor X and fraction p, τ_p = the calibrated (1 − p)
   quantile of |X| (from the histogram, linear inside the bin). Arms, each one ONNX graph in
   which every GEMM reading X reads X' instead (other consumers keep X):
     ``outlier``: X' = Where(|X| > τ_p, 0, X)                 (drop the largest p of values)
     ``random``:  X' = Where(RandomUniformLike(X, seed) < p, 0, X)   (drop p at random; a fixed
                  seed per tensor, a fresh mask every call, deterministic run to run)
     ``clip``:    X' = Clip(X, −τ_p, τ_p)                     (keep them, clipped: what a
                  layer-wise MSE/percentile quantizer does to outliers)
     ``outlier-internal``: ``outlier`` on every GEMM input except the graph inputs (``sample``,
                  ``encoder_hidden_states``): the drop inside the network only
   Every arm samples the same prompts and seeds as the float model (DDIM 25 steps, guidance 4,
   contexts from the float model's text encoder: ``qcompiler.diffusion.evaluate.sample_model``'s
   loop with one ORT thread) and is scored against the float images: PSNR (mean of per-image),
   SSIM, and the MNIST classifier's accuracy on the prompted digits. The fraction of elements
   each arm really zeroes (or clips) is measured by a copy of the graph that also returns
   ReduceSum(mask) per tensor, on ``--measure-files`` calibration files spread over the timesteps.
2. **Start-token share of cross-attention.** Per cross-attention Softmax (``find_attention`` kind
   "cross"), per sample: Â_0 / L_q with Â_j = Σ_i mean_h A[h, i, j] (``inspect.attention``),
   averaged overall, per timestep and per half (conditional / unconditional rows), against the
   uniform share 1 / L_k (L_k = 10 context tokens; key 0 is ``<bos>``).
3. **Which axis D_d picks.** Per GEMM input: D_channel and D_pixel (``inspect.activations.dgq_view``,
   the formula of ``dgq_groups.axis_spread``) on the per-channel / per-position min/max, d* =
   argmax, grouped by layer type (from the consumers' diffusers module paths).

Writes ``outliers.json``, ``outliers.md`` and ``outliers.png`` to ``--out``.

Usage: python benchmarks/bench_outliers.py [--out benchmarks/results] [--samples 32]
       [--fractions 1e-4 1e-3 1e-2] [--arms outlier random clip outlier-internal] [--calib-limit N]
       [--measure-files 5] [--threads 1] [--work DIR] [--model models/unet_mnist.onnx]
"""


from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outlier_graphs import ARMS, build_arm
from outlier_report import attention_tables, verdicts, write_outputs

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "unet_mnist.onnx")
    parser.add_argument("--calib", type=Path, default=None, help="default: <model>.calib")
    parser.add_argument("--calib-limit", type=int, default=None, help="calibration samples for the statistics")
    parser.add_argument("--samples", type=int, default=32, help="images per arm (prompts/seeds 0..N-1)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="outlier-internal: the outlier arm without the graph inputs (sample, context)")
    parser.add_argument("--measure-files", type=int, default=5,
                        help="calibration files (spread over the timesteps) on which the dropped fraction is measured")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra_op_num_threads")
    parser.add_argument("--work", type=Path, default=None, help="folder for the modified models (default: temp)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- layer types

def layer_type(node: str) -> str:
    """A coarse layer type from a diffusers module path in an exported node name."""
    rules = (("time_embedding/linear", "time-embedding Linear"), ("time_emb_proj", "ResNet time_emb_proj"),
             ("add_embedding", "text-time embedding (pool/proj)"),
             ("/attn1/to_q", "self-attn q/k/v"), ("/attn1/to_k", "self-attn q/k/v"),
             ("/attn1/to_v", "self-attn q/k/v"), ("/attn2/to_q", "cross-attn q"),
             ("/attn2/to_k", "cross-attn k/v (text)"), ("/attn2/to_v", "cross-attn k/v (text)"),
             ("/to_out", "attn out proj"), ("/ff/net.0", "FF in (GEGLU)"), ("/ff/net.2", "FF out"),
             ("proj_in", "transformer proj_in"), ("proj_out", "transformer proj_out"),
             ("conv_shortcut", "ResNet conv_shortcut"), ("/conv1/", "ResNet conv1"), ("/conv2/", "ResNet conv2"),
             ("samplers", "down/up-sampler conv"), ("conv_in", "conv_in"), ("conv_out", "conv_out"))
    for key, name in rules:
        if key in node:
            return name
    return "other"


def tensor_type(consumers: tuple[str, ...]) -> str:
    return " + ".join(sorted({layer_type(c) for c in consumers}))


# --------------------------------------------------------------------------- statistics

def abs_quantile(stats, q: float) -> float:
    """The q quantile of |x| from a TensorStats histogram (uniform inside the bin that holds it)."""
    counts, edges = stats.hist_counts, stats.hist_edges
    total = int(counts.sum())
    if total == 0 or edges[-1] == 0:
        return 0.0
    tail_wanted = (1.0 - q) * total  # values above τ
    tail = np.cumsum(counts[::-1])[::-1]  # tail[k] = count in bins k..end
    above = np.concatenate([tail[1:], [0]])  # count strictly in bins k+1..end
    k = int(np.flatnonzero(tail >= tail_wanted)[-1]) if (tail >= tail_wanted).any() else 0
    need = tail_wanted - above[k]
    inside = counts[k] if counts[k] else 1
    tau = edges[k + 1] - (need / inside) * (edges[k + 1] - edges[k])
    return float(min(max(tau, edges[k]), stats.absmax))


def gather_statistics(model_path: Path, batches, gemm_inputs, cross_sites, threads: int):
    """One streaming pass: TensorStats per GEMM input, AttentionMass per (site, timestep, half)."""
    from qcompiler.calibration.statistics import (
        StatsConfig,
        TensorStats,
        stream_tensors,
    )
    from qcompiler.inspect.attention import AttentionMass

    config = StatsConfig(tensors_per_run=256, per_index=True, threads=threads, progress=False)
    axes = {a.tensor: a.channel_axis for a in gemm_inputs}
    kinds = {s.tensor: s.kind for s in cross_sites}
    stats, masses = {}, {}

    def fold(batch, values):
        steps = batch.metadata["__timestep__"]
        cond = batch.metadata["__label__"] >= 0
        for name, value in values.items():
            if name in kinds:
                for t in np.unique(steps):
                    for half, rows in (("cond", cond), ("uncond", ~cond)):
                        pick = (steps == t) & rows
                        if pick.any():
                            key = (name, int(t), half)
                            masses.setdefault(key, AttentionMass(name, kinds[name])).update(value[pick])
                continue
            if name not in stats:
                stats[name] = TensorStats.start(name, value, axes[name], config.histogram_bins, True)
            stats[name].update(value, batch.source)

    tensors = [a.tensor for a in gemm_inputs] + [s.tensor for s in cross_sites]
    for batch, values in stream_tensors(str(model_path), batches, tensors, config):
        fold(batch, values)
        del values
    return stats, masses


# --------------------------------------------------------------------------- sampling

def sample_images(path: Path, float_path: Path, samples: int, config, seed: int, threads: int):
    """``evaluate.sample_model`` with the denoiser's ORT session on ``threads`` threads."""
    from qcompiler.diffusion.conditioning import conditioner_for
    from qcompiler.diffusion.sampler import OnnxDenoiser, sample
    from qcompiler.diffusion.text import prompts_for

    denoiser = OnnxDenoiser(path, threads=threads)
    condition = conditioner_for(float_path, denoiser.condition_input)
    captions, labels = prompts_for(samples, float_path)
    images = sample(denoiser, condition(captions), condition.empty(), list(range(seed, seed + samples)), config)
    return images, labels


def score(images, reference, labels, classifier) -> dict:
    from qcompiler.diffusion import metrics

    logits, _ = classifier(images)
    psnr = metrics.psnr_per_image(reference, images)
    finite = psnr[np.isfinite(psnr)]
    # Mean of per-image PSNR over the images that differ (an identical image has PSNR = inf).
    return {"psnr_db": float(np.mean(finite)) if finite.size else float("inf"),
            "identical_images": int(psnr.size - finite.size),
            "psnr_db_all": metrics.psnr(reference, images), "ssim": metrics.ssim(reference, images),
            "accuracy": metrics.accuracy(logits, labels)}


# --------------------------------------------------------------------------- main

def run_meta(args: argparse.Namespace, argv: list[str] | None) -> dict:
    import onnxruntime

    return {"command": "python benchmarks/bench_outliers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "threads": args.threads, "model": str(args.model)}


def axis_choice(gemm_inputs, stats) -> list[dict]:
    """3. D_channel, D_pixel and d* per GEMM input."""
    from qcompiler.inspect.activations import dgq_view

    axis_rows = []
    for act in gemm_inputs:
        view = dgq_view(stats[act.tensor])
        # One channel (conv_in's 1-channel image) or one position (time-embedding vectors): that
        # axis's D is 0 by construction, so the comparison says nothing; such tensors are flagged.
        sizes = {"channel": stats[act.tensor].channel_min.size, "pixel": stats[act.tensor].index_min.size}
        degenerate = min(sizes.values()) == 1
        ratio = None if degenerate or not view["D_channel"] else view["D_pixel"] / view["D_channel"]
        axis_rows.append({"tensor": act.tensor, "label": act.label, "type": tensor_type(act.consumers),
                          "consumers": list(act.consumers), "channel_axis": act.channel_axis,
                          "shape": list(stats[act.tensor].shape), "D_channel": view["D_channel"],
                          "D_pixel": view["D_pixel"], "d_star": view["axis"], "ratio": ratio,
                          "channels": int(sizes["channel"]), "positions": int(sizes["pixel"]),
                          "degenerate": degenerate,
                          "absmax": stats[act.tensor].absmax, "mean_abs": stats[act.tensor].mean_abs()})
    return axis_rows


def axis_by_layer_type(axis_rows: list[dict]) -> dict:
    """3. The axis choice grouped by layer type (most tensors first)."""
    by_type = {}
    for row in axis_rows:
        by_type.setdefault(row["type"], []).append(row)
    axis_by_type = {}
    for name, rows in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        kept = [r for r in rows if not r["degenerate"]]
        axis_by_type[name] = {"tensors": len(rows), "channel": sum(r["d_star"] == "channel" for r in kept),
                              "pixel": sum(r["d_star"] == "pixel" for r in kept),
                              "degenerate": len(rows) - len(kept),
                              "ratio_median": float(np.median(ratios)) if ratios else float("nan"),
                              "ratio_min": float(min(ratios)) if ratios else float("nan"),
                              "ratio_max": float(max(ratios)) if ratios else float("nan")}
    return axis_by_type


def drop_experiment(args, proto, batches, stats, gemm_inputs, graph_inputs: set[str], work: Path,
                    timing: dict) -> tuple[dict, list]:
    """1. Float images, then every (p, arm): build, measure, sample, score. Returns (drop, image strip)."""
    from qcompiler.diffusion.metrics import Classifier
    from qcompiler.diffusion.sampler import config_for

    config = config_for(args.model, steps=args.steps, guidance_scale=args.guidance)
    classifier = Classifier.for_denoiser(args.model)
    t0 = time.perf_counter()
    print(f"[bench_outliers] float: sampling {args.samples} images ...", flush=True)
    reference, labels = sample_images(args.model, args.model, args.samples, config, args.seed, args.threads)
    float_quality = score(reference, reference, labels, classifier)
    pick = np.linspace(0, len(batches) - 1, min(args.measure_files, len(batches))).round().astype(int)
    measure_batches = [batches[i] for i in sorted(set(pick.tolist()))]
    drop_rows, strip = [], [("float", reference[:10])]
    for p in sorted(args.fractions):
        taus = {a.tensor: abs_quantile(stats[a.tensor], 1.0 - p) for a in gemm_inputs}
        for arm in args.arms:
            name, path, subset, measured = build_arm(proto, arm, p, taus, gemm_inputs, graph_inputs, work,
                                                     measure_batches, args.threads)
            print(f"[bench_outliers] {name}: measured fraction {measured['fraction']:.2e}; sampling ...", flush=True)
            images, _ = sample_images(path, args.model, args.samples, config, args.seed, args.threads)
            row = {"arm": arm, "p": p, "measured": measured, **score(images, reference, labels, classifier)}
            if arm != "random":
                row["tau"] = {a.tensor: taus[a.tensor] for a in subset}
            drop_rows.append(row)
            print(f"    PSNR {row['psnr_db']:.2f} dB  SSIM {row['ssim']:.3f}  accuracy {row['accuracy']:.3f}", flush=True)
            if p == max(args.fractions):
                strip.append((f"{arm} p={p:g}", images[:10]))
    timing["sampling"] = time.perf_counter() - t0
    drop = {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
            "measure_files": len(measure_batches),
            "measure_timesteps": [int(b.metadata["__timestep__"][0]) for b in measure_batches],
            "tensors": [a.tensor for a in gemm_inputs], "float": float_quality, "rows": drop_rows}
    return drop, strip


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    meta = run_meta(args, argv)
    from qcompiler.calibration.readers import load_calibration
    from qcompiler.graph import load_model, to_graph
    from qcompiler.inspect.targets import find_targets

    work = args.work or Path(tempfile.mkdtemp(prefix="qcompile-bench-outliers-"))
    work.mkdir(parents=True, exist_ok=True)
    proto = load_model(args.model)
    targets = find_targets(to_graph(proto))
    gemm_inputs = [a for a in targets.activations if "gemm_input" in a.roles]
    cross = [s for s in targets.attention if s.kind == "cross"]
    graph_inputs = {value.name for value in proto.graph.input}
    batches = load_calibration(args.calib or args.model.with_suffix(".calib"), proto, limit=args.calib_limit)
    timesteps = sorted({int(t) for b in batches for t in b.metadata["__timestep__"]})
    meta["calibration"] = {"files": len(batches), "samples": sum(b.batch_size for b in batches),
                           "timesteps": len(timesteps)}
    print(f"[bench_outliers] {len(gemm_inputs)} GEMM inputs, {len(cross)} cross-attention Softmax outputs, "
          f"{meta['calibration']['samples']} calibration samples; statistics ...", flush=True)

    t0 = time.perf_counter()
    stats, masses = gather_statistics(args.model, batches, gemm_inputs, cross, args.threads)
    timing = {"statistics": time.perf_counter() - t0}
    axis_rows = axis_choice(gemm_inputs, stats)  # 3. axis choice
    attention_rows = attention_tables(masses, cross)  # 2. start-token share
    key_mean = {half: np.mean([a["share_per_key"][half] for a in attention_rows], axis=0).tolist()
                for half in ("cond", "uncond")}
    drop, strip = drop_experiment(args, proto, batches, stats, gemm_inputs, graph_inputs, work, timing)  # 1.

    result = {"meta": meta, "drop": drop, "attention": attention_rows, "attention_key_mean": key_mean,
              "axis": axis_rows, "axis_by_type": axis_by_layer_type(axis_rows)}
    result["verdicts"] = verdicts(result)
    meta["timing_s"] = timing
    text = write_outputs(result, strip, args.out, started)
    print(text)
    print(f"[bench_outliers] total {meta['runtime_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
