"""Reproduce DGQ's observations (seed 002, DESIGN.md §5.4) on the trained text-to-image UNet (CPU).

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
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("outlier", "random", "clip", "outlier-internal")


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


# --------------------------------------------------------------------------- graph rewriting

def drop_model(model: onnx.ModelProto, gemm_inputs, taus: dict[str, float] | None, arm: str, p: float,
               seed: int, measure: bool) -> onnx.ModelProto:
    """A copy of ``model`` in which every GEMM reading X reads the arm's X' (see the module docstring).

    With ``measure`` the graph also returns, per tensor i, ``drop_count/i`` = Σ mask (int64) and
    ``drop_size/i`` = Size(X).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes_by_name = {n.name: n for n in graph.node}
    zero = numpy_helper.from_array(np.zeros((), np.float32), "bench_drop/zero")
    graph.initializer.append(zero)
    new_nodes, outputs = [], []
    for i, act in enumerate(gemm_inputs):
        x, prefix = act.tensor, f"bench_drop/{i}"
        if arm == "outlier" or arm == "clip":
            tau = numpy_helper.from_array(np.array(taus[x], np.float32), f"{prefix}/tau")
            graph.initializer.append(tau)
            new_nodes += [helper.make_node("Abs", [x], [f"{prefix}/abs"], name=f"{prefix}/Abs"),
                          helper.make_node("Greater", [f"{prefix}/abs", tau.name], [f"{prefix}/mask"],
                                           name=f"{prefix}/Greater")]
            if arm == "outlier":
                new_nodes.append(helper.make_node("Where", [f"{prefix}/mask", zero.name, x], [f"{prefix}/x"],
                                                  name=f"{prefix}/Where"))
            else:
                neg = numpy_helper.from_array(np.array(-taus[x], np.float32), f"{prefix}/neg_tau")
                graph.initializer.append(neg)
                new_nodes.append(helper.make_node("Clip", [x, neg.name, tau.name], [f"{prefix}/x"],
                                                  name=f"{prefix}/Clip"))
        elif arm == "random":
            prob = numpy_helper.from_array(np.array(p, np.float32), f"{prefix}/p")
            graph.initializer.append(prob)
            new_nodes += [helper.make_node("RandomUniformLike", [x], [f"{prefix}/u"], name=f"{prefix}/Random",
                                           seed=float(seed + i), dtype=TensorProto.FLOAT),
                          helper.make_node("Less", [f"{prefix}/u", prob.name], [f"{prefix}/mask"], name=f"{prefix}/Less"),
                          helper.make_node("Where", [f"{prefix}/mask", zero.name, x], [f"{prefix}/x"],
                                           name=f"{prefix}/Where")]
        else:
            raise ValueError(arm)
        if measure:
            new_nodes += [helper.make_node("Cast", [f"{prefix}/mask"], [f"{prefix}/mask64"], to=TensorProto.INT64,
                                           name=f"{prefix}/Cast"),
                          helper.make_node("ReduceSum", [f"{prefix}/mask64"], [f"drop_count/{i}"], keepdims=0,
                                           name=f"{prefix}/ReduceSum"),
                          helper.make_node("Size", [x], [f"drop_size/{i}"], name=f"{prefix}/Size")]
            outputs += [helper.make_tensor_value_info(f"drop_count/{i}", TensorProto.INT64, []),
                        helper.make_tensor_value_info(f"drop_size/{i}", TensorProto.INT64, [])]
        for consumer in act.consumers:
            node = nodes_by_name[consumer]
            if node.input[0] != x:
                raise RuntimeError(f"{consumer}: input 0 is {node.input[0]}, expected {x}")
            node.input[0] = f"{prefix}/x"
    # Topological order: a graph input's rewrite goes first; any other right after its producer.
    producer_index = {name: k for k, n in enumerate(graph.node) for name in n.output}
    inserts: dict[int, list] = {}
    for node in new_nodes:
        source = node.input[0]
        while source.startswith("bench_drop/"):  # chained rewrite nodes follow their first one
            source = next(n.input[0] for n in new_nodes if source in n.output)
        inserts.setdefault(producer_index.get(source, -1), []).append(node)
    ordered = list(inserts.get(-1, []))
    for k, node in enumerate(graph.node):
        ordered.append(node)
        ordered += inserts.get(k, [])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.output.extend(outputs)
    return out


def measure_drops(path: Path, batches, gemm_inputs, threads: int) -> dict:
    """Dropped / total elements per tensor and overall on ``batches`` (the measuring copy of an arm)."""
    from qcompiler.runtimes.ort import make_session

    session = make_session(path, threads=threads)
    names = [f"drop_count/{i}" for i in range(len(gemm_inputs))] + [f"drop_size/{i}" for i in range(len(gemm_inputs))]
    wanted = [i.name for i in session.get_inputs()]
    dropped = np.zeros(len(gemm_inputs), np.int64)
    sizes = np.zeros(len(gemm_inputs), np.int64)
    per_file = []
    for batch in batches:
        values = session.run(names, {k: batch.feeds[k] for k in wanted})
        counts, size = np.array(values[:len(gemm_inputs)]), np.array(values[len(gemm_inputs):])
        dropped += counts
        sizes += size
        per_file.append({"file": Path(batch.source).name, "timestep": int(batch.metadata["__timestep__"][0]),
                         "fraction": float(counts.sum() / size.sum())})
    fractions = dropped / np.maximum(sizes, 1)
    return {"dropped": int(dropped.sum()), "elements": int(sizes.sum()), "fraction": float(dropped.sum() / sizes.sum()),
            "per_tensor_fraction": {"min": float(fractions.min()), "median": float(np.median(fractions)),
                                    "max": float(fractions.max())},
            "per_file": per_file, "per_tensor": fractions.tolist()}


# --------------------------------------------------------------------------- sampling

def sample_images(path: Path, float_path: Path, samples: int, config, seed: int, threads: int):
    """``evaluate.sample_model`` with the denoiser's ORT session on ``threads`` threads."""
    from qcompiler.diffusion.conditioning import conditioner_for
    from qcompiler.diffusion.sampler import OnnxDenoiser, sample
    from qcompiler.diffusion.text import prompts_for

    denoiser = OnnxDenoiser(path, threads=threads)
    condition = conditioner_for(float_path, denoiser.condition_input)
    captions, labels = prompts_for(samples)
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


# --------------------------------------------------------------------------- report

def attention_tables(masses: dict, sites) -> list[dict]:
    rows = []
    for site in sites:
        keys = [k for k in masses if k[0] == site.tensor]
        timesteps = sorted({k[1] for k in keys}, reverse=True)

        def mean_share(selected):
            total = sum(masses[k].start_share_sum for k in selected)
            count = sum(masses[k].samples for k in selected)
            return total / count if count else None

        key_mass = {}
        for half in ("cond", "uncond"):
            chosen = [k for k in keys if k[2] == half]
            mass = sum(masses[k].mass for k in chosen)
            queries = masses[chosen[0]].queries if chosen else 1
            samples = sum(masses[k].samples for k in chosen)
            key_mass[half] = (mass / (samples * queries)).tolist() if samples else []
        lk = int(masses[keys[0]].mass.size) if keys else 0
        rows.append({
            "tensor": site.tensor, "label": site.label, "keys": lk, "uniform_share": 1.0 / lk if lk else None,
            "start_share": {"all": mean_share(keys), "cond": mean_share([k for k in keys if k[2] == "cond"]),
                            "uncond": mean_share([k for k in keys if k[2] == "uncond"]),
                            "max": max((masses[k].start_share_max for k in keys), default=None)},
            "per_timestep": [{"timestep": t, "all": mean_share([k for k in keys if k[1] == t]),
                              "cond": mean_share([k for k in keys if k[1] == t and k[2] == "cond"]),
                              "uncond": mean_share([k for k in keys if k[1] == t and k[2] == "uncond"])}
                             for t in timesteps],
            "share_per_key": key_mass,
        })
    return rows


def short(label: str) -> str:
    return (label.replace("attentions.", "att").replace("transformer_blocks.0/", "").replace("down_blocks.", "down")
            .replace("up_blocks.", "up").replace("mid_block", "mid").replace("/Softmax", ""))


def markdown(result: dict) -> str:
    meta, drop = result["meta"], result["drop"]
    lines = ["# DGQ observations on the trained UNet (models/unet_mnist.onnx)", "",
             f"Command: `{meta['command']}`  ", f"Date (UTC): {meta['date']}  ",
             (f"Machine: {meta['cpus']} CPUs (1-min load {meta['load']:.2f} at start), Python {meta['python']}, "
             f"onnxruntime {meta['onnxruntime']}, intra_op_num_threads={meta['threads']}  "),
             (f"Runtime: {meta['runtime_s']:.0f} s (statistics {meta['timing_s']['statistics']:.0f} s, "
             f"sampling {meta['timing_s']['sampling']:.0f} s)  "),
             (f"Calibration: {meta['calibration']['samples']} samples in {meta['calibration']['files']} files "
             f"({meta['calibration']['timesteps']} timesteps); {len(result['axis'])} GEMM-input tensors; "
             f"{drop['samples']} images per arm (DDIM {drop['steps']} steps, guidance {drop['guidance']}), "
             "scored against the float model's images from the same prompts and seeds."), "",
             "## 1. Dropping the largest activations vs the same number of random ones", "",
             ("Every input of a Linear/Conv (the tensors recipes quantize) is rewritten in front of its GEMMs: "
             "`outlier` zeroes |X| > τ_p (τ_p = calibrated (1−p) quantile of |X|, per tensor), `random` zeroes a "
             "random fraction p (RandomUniformLike, fixed seed), `clip` clamps X to ±τ_p, `outlier-internal` is `outlier` "
             "without the graph inputs `sample` and `encoder_hidden_states`. "
             "*measured dropped* = zeroed (or clipped) / all elements of those tensors in the modified model on "
             f"{drop['measure_files']} calibration files (timesteps {', '.join(str(t) for t in drop['measure_timesteps'])})."),
             ("PSNR dB = mean of per-image PSNR vs the float image (images that came out identical left out, "
             "counted in *same*); pooled = PSNR over all pixels at once."),
             "", ("| arm | p | tensors | measured dropped | per-tensor min–max | PSNR dB | pooled dB | same | SSIM "
             "| accuracy |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| float | 0 | 0 | 0 | – | ∞ | ∞ | {drop['samples']} | 1.000 | {drop['float']['accuracy']:.3f} |"]
    for row in drop["rows"]:
        m = row["measured"]
        lines.append(f"| {row['arm']} | {row['p']:g} | {m['tensors']} | {m['fraction']:.2e} ({m['dropped']:,}) | "
                     f"{m['per_tensor_fraction']['min']:.1e}–{m['per_tensor_fraction']['max']:.1e} | "
                     f"{row['psnr_db']:.2f} | {row['psnr_db_all']:.2f} | {row['identical_images']} | "
                     f"{row['ssim']:.3f} | {row['accuracy']:.3f} |")
    lines += ["", f"**Verdict:** {result['verdicts']['drop']}", "",
              "## 2. Start-token (`<bos>`, key 0) share of cross-attention", "",
              ("Mean over samples of Â_0 / L_q (head-averaged attention mass on key 0), calibration set; "
              "uniform share = 1/L_k."), "",
              "| layer | L_k | all | cond | uncond | max | × uniform | highest-t (noisiest) → lowest-t, all rows |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in result["attention"]:
        s = row["start_share"]
        per_t = row["per_timestep"]
        trend = f"{per_t[0]['all']:.3f} (t={per_t[0]['timestep']}) → {per_t[len(per_t) // 2]['all']:.3f} " \
                f"(t={per_t[len(per_t) // 2]['timestep']}) → {per_t[-1]['all']:.3f} (t={per_t[-1]['timestep']})"
        lines.append(f"| {short(row['label'])} | {row['keys']} | {s['all']:.3f} | {s['cond']:.3f} | {s['uncond']:.3f} "
                     f"| {s['max']:.3f} | {s['all'] / row['uniform_share']:.2f} | {trend} |")
    lines += ["", "Share per key (conditional rows, mean over layers): "
              + ", ".join(f"k{j} {v:.3f}" for j, v in enumerate(result["attention_key_mean"]["cond"])), "",
              "Share per key (unconditional rows, mean over layers): "
              + ", ".join(f"k{j} {v:.3f}" for j, v in enumerate(result["attention_key_mean"]["uncond"])), "",
              f"**Verdict:** {result['verdicts']['attention']}", "",
              "## 3. D_channel vs D_pixel (DGQ's axis choice) per layer type", "",
              ("D_d = (max_i a^max − min_i a^max) + (max_i a^min − min_i a^min) over the indices of axis d "
              "(channels; pixels/tokens), from the calibration set; d* = argmax."), "",
              ("| layer type | tensors | d* = channel | d* = pixel | one-index axis (n/a) "
              "| D_pixel/D_channel median | min | max |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def number(value):
        return "–" if value is None or not np.isfinite(value) else f"{value:.2f}"
    for name, row in result["axis_by_type"].items():
        lines.append(f"| {name} | {row['tensors']} | {row['channel']} | {row['pixel']} | {row['degenerate']} | "
                     f"{number(row['ratio_median'])} | {number(row['ratio_min'])} | {number(row['ratio_max'])} |")
    total = Counter(a["d_star"] for a in result["axis"] if not a["degenerate"])
    odd = [f"{a['label']} ({a['channels']} ch × {a['positions']} pos)" for a in result["axis"] if a["degenerate"]]
    lines += ["", (f"All (excluding one-index axes): {dict(total)}. Left out (D of a one-index axis is 0 by "
              f"construction): {', '.join(odd)}."), "", f"**Verdict:** {result['verdicts']['axis']}", "",
              ("Plot: `outliers.png` (PSNR vs p per arm; start-token share per layer and per timestep; "
              "D_pixel/D_channel per tensor by type; a strip of float / outlier / random / clip images at the "
              "largest p)."), ""]
    return "\n".join(lines)


def verdicts(result: dict) -> dict:
    rows = result["drop"]["rows"]
    float_accuracy = result["drop"]["float"]["accuracy"]
    by = {(r["arm"], r["p"]): r for r in rows}
    fractions = sorted(p for p in {r["p"] for r in rows} if ("outlier", p) in by and ("random", p) in by)
    clauses = []
    for p in fractions:
        o, r = by[("outlier", p)], by[("random", p)]
        numbers = (f"outlier {o['psnr_db']:.1f} dB / SSIM {o['ssim']:.2f} / acc {o['accuracy']:.2f} vs random "
                   f"{r['psnr_db']:.1f} dB / SSIM {r['ssim']:.2f} / acc {r['accuracy']:.2f}")
        worse = r["psnr_db"] - o["psnr_db"] > 3 or r["accuracy"] - o["accuracy"] > 0.1
        # "barely matters": images stay close to float (PSNR ≥ 20 dB) and the digits stay right.
        harmless = r["psnr_db"] >= 20 and r["accuracy"] >= float_accuracy - 0.05
        if worse and harmless:
            verdict = "reproduced"
        elif worse:
            verdict = "outliers still do more harm, but random drops are not harmless either"
        else:
            verdict = "not reproduced"
        clauses.append(f"p = {p:g}: {verdict} ({numbers})")
    drop = "; ".join(clauses) + f". Float accuracy {float_accuracy:.2f}."
    att = result["attention"]
    share = {half: [a["start_share"][half] / a["uniform_share"] for a in att] for half in ("cond", "uncond")}
    if min(share["cond"]) > 2:
        head = "Reproduced: with a prompt, every cross-attention layer puts several times the uniform share on <bos>"
    elif max(share["cond"]) > 2:
        head = "Partly reproduced: with a prompt, some cross-attention layers concentrate on <bos>, others do not"
    else:
        head = "Not reproduced: with a prompt, <bos> draws about its uniform share or less"
    attention = (f"{head} (share on key 0 / uniform, conditional rows: {min(share['cond']):.2f}–"
                 f"{max(share['cond']):.2f}× over {len(att)} layers; unconditional rows, empty prompt "
                 f"`<bos> <eos> <pad>…`: {min(share['uncond']):.2f}–{max(share['uncond']):.2f}×).")
    types = result["axis_by_type"]
    mixed = [n for n, r in types.items() if r["pixel"] and r["channel"]]
    pixel = [n for n, r in types.items() if r["pixel"] and not r["channel"]]
    channel = [n for n, r in types.items() if r["channel"] and not r["pixel"]]
    n_pixel, n_channel = sum(r["pixel"] for r in types.values()), sum(r["channel"] for r in types.values())
    axis = (f"D_d picks pixel for {n_pixel} and channel for {n_channel} tensors (one-index axes left out). "
            f"Pixel only: {', '.join(pixel) or 'none'}; channel only: {', '.join(channel) or 'none'}; "
            f"both: {', '.join(mixed) or 'none'}. "
            + ("Both kinds of layer exist, as in the paper." if n_pixel and n_channel and n_pixel >= 0.1 * n_channel
               else "Not as in the paper: channel-wise spread dominates almost everywhere; pixel-wise layers are "
                    "rare or absent in this model."))
    return {"drop": drop, "attention": attention, "axis": axis}


def plot(result: dict, strip: list[tuple[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.75])
    ax = fig.add_subplot(grid[0, 0])
    colours = {"outlier": "tab:red", "random": "tab:blue", "clip": "tab:green", "outlier-internal": "tab:orange"}
    ax2 = ax.twinx()
    for arm in ARMS:
        rows = sorted((r for r in result["drop"]["rows"] if r["arm"] == arm), key=lambda r: r["p"])
        if rows:
            ax.plot([r["p"] for r in rows], [min(r["psnr_db"], 60) for r in rows], "o-", color=colours[arm],
                    label=f"{arm}: PSNR")
            ax2.plot([r["p"] for r in rows], [r["accuracy"] for r in rows], "s--", color=colours[arm], alpha=0.5,
                     label=f"{arm}: accuracy")
    ax2.axhline(result["drop"]["float"]["accuracy"], color="gray", ls=":", lw=1)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("classifier accuracy (dashed; dotted = float)")
    ax.set_xscale("log")
    ax.set_xlabel("fraction p of each GEMM input zeroed (or clipped)")
    ax.set_ylabel("PSNR vs float images, dB (solid)")
    ax.set_title("1. largest |X| vs random X dropped")
    ax.legend(loc="lower left", fontsize=7)

    att = result["attention"]
    ax = fig.add_subplot(grid[0, 1])
    labels = [short(a["label"]) for a in att]
    x = np.arange(len(att))
    ax.bar(x - 0.2, [a["start_share"]["cond"] for a in att], 0.4, label="conditional rows")
    ax.bar(x + 0.2, [a["start_share"]["uncond"] for a in att], 0.4, label="unconditional rows")
    ax.axhline(att[0]["uniform_share"], color="k", ls="--", lw=1, label="uniform 1/L_k")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean attention share on key 0 (<bos>)")
    ax.set_title("2. start-token share per cross-attention layer")
    ax.legend(fontsize=7)

    ax = fig.add_subplot(grid[1, 0])
    for a, label in zip(att, labels):
        ts = [r["timestep"] for r in a["per_timestep"]]
        ax.plot(ts, [r["cond"] for r in a["per_timestep"]], "-", label=label)
    ax.axhline(att[0]["uniform_share"], color="k", ls="--", lw=1)
    ax.invert_xaxis()
    ax.set_xlabel("timestep (reversed: sampling order, noisiest on the left)")
    ax.set_ylabel("share on key 0, conditional rows")
    ax.set_title("2. start-token share per timestep")
    ax.legend(fontsize=6, ncol=2)

    ax = fig.add_subplot(grid[1, 1])
    types = list(result["axis_by_type"])
    for k, name in enumerate(types):
        ratios = [a["ratio"] for a in result["axis"] if a["type"] == name and a["ratio"] is not None]
        jitter = np.linspace(-0.15, 0.15, len(ratios)) if len(ratios) > 1 else [0]
        ax.scatter(np.full(len(ratios), k) + jitter, np.maximum(ratios, 1e-3), s=14)
    ax.axhline(1, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(types)), types, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("D_pixel / D_channel  (>1: d* = pixel)")
    ax.set_title("3. DGQ axis choice per GEMM input")

    ax = fig.add_subplot(grid[2, :])
    tiles = [np.concatenate([np.pad(img[0], 1, constant_values=1.0) for img in images], axis=1)
             for _, images in strip]
    ax.imshow(np.clip(np.concatenate(tiles, axis=0), -1, 1), cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([34 * k + 17 for k in range(len(strip))], [name for name, _ in strip], fontsize=8)
    ax.set_xticks([])
    ax.set_title("same prompts and seeds (digits 0–9)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    import onnxruntime

    from qcompiler.calibration.readers import load_calibration
    from qcompiler.diffusion.metrics import Classifier
    from qcompiler.diffusion.sampler import config_for
    from qcompiler.graph import load_model, to_graph
    from qcompiler.inspect.activations import dgq_view
    from qcompiler.inspect.targets import find_targets

    meta = {"command": "python benchmarks/bench_outliers.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "load": os.getloadavg()[0], "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "threads": args.threads, "model": str(args.model)}
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

    # 3. axis choice
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

    # 2. start-token share
    attention_rows = attention_tables(masses, cross)
    key_mean = {half: np.mean([a["share_per_key"][half] for a in attention_rows], axis=0).tolist()
                for half in ("cond", "uncond")}

    # 1. drop experiment
    config = config_for(args.model, steps=args.steps, guidance_scale=args.guidance)
    classifier = Classifier()
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
            name = f"{arm}_p{p:g}"
            path, measure_path = work / f"{name}.onnx", work / f"{name}.measure.onnx"
            subset = [a for a in gemm_inputs if a.tensor not in graph_inputs] if arm == "outlier-internal" \
                else gemm_inputs
            kind = "outlier" if arm == "outlier-internal" else arm
            onnx.save(drop_model(proto, subset, taus, kind, p, 1000, measure=False), str(path))
            onnx.save(drop_model(proto, subset, taus, kind, p, 1000, measure=True), str(measure_path))
            measured = measure_drops(measure_path, measure_batches, subset, args.threads)
            measured["tensors"] = len(subset)
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

    result = {
        "meta": meta,
        "drop": {"samples": args.samples, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                 "measure_files": len(measure_batches),
                 "measure_timesteps": [int(b.metadata["__timestep__"][0]) for b in measure_batches],
                 "tensors": [a.tensor for a in gemm_inputs], "float": float_quality, "rows": drop_rows},
        "attention": attention_rows, "attention_key_mean": key_mean,
        "axis": axis_rows, "axis_by_type": axis_by_type,
    }
    result["verdicts"] = verdicts(result)
    meta["timing_s"] = timing
    meta["runtime_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, strip, args.out / "outliers.png")
    meta["runtime_s"] = time.perf_counter() - started
    (args.out / "outliers.json").write_text(json.dumps(result, indent=1, default=float))
    text = markdown(result)
    (args.out / "outliers.md").write_text(text)
    print(text)
    print(f"[bench_outliers] total {meta['runtime_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
