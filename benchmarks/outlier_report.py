"""Attention tables, verdicts, Markdown, JSON and the PNG for ``bench_outliers``'s results."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from outlier_graphs import ARMS


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


# --------------------------------------------------------------------------- Markdown

def _header_lines(result: dict) -> list[str]:
    meta, drop = result["meta"], result["drop"]
    return ["# DGQ observations on the trained UNet (models/unet_mnist.onnx)", "",
            f"Command: `{meta['command']}`  ", f"Date (UTC): {meta['date']}  ",
            (f"Machine: {meta['cpus']} CPUs (1-min load {meta['load']:.2f} at start), Python {meta['python']}, "
             f"onnxruntime {meta['onnxruntime']}, intra_op_num_threads={meta['threads']}  "),
            (f"Runtime: {meta['runtime_s']:.0f} s (statistics {meta['timing_s']['statistics']:.0f} s, "
             f"sampling {meta['timing_s']['sampling']:.0f} s)  "),
            (f"Calibration: {meta['calibration']['samples']} samples in {meta['calibration']['files']} files "
             f"({meta['calibration']['timesteps']} timesteps); {len(result['axis'])} GEMM-input tensors; "
             f"{drop['samples']} images per arm (DDIM {drop['steps']} steps, guidance {drop['guidance']}), "
             "scored against the float model's images from the same prompts and seeds."), ""]


def _drop_lines(result: dict) -> list[str]:
    drop = result["drop"]
    lines = ["## 1. Dropping the largest activations vs the same number of random ones", "",
             ("Every input of a Linear/Conv (the tensors recipes quantize) is rewritten in front of its GEMMs: "
              "`outlier` zeroes |X| > τ_p (τ_p = calibrated (1−p) quantile of |X|, per tensor), `random` zeroes a "
              "random fraction p (RandomUniformLike, fixed seed), `clip` clamps X to ±τ_p, `outlier-internal` is "
              "`outlier` without the graph inputs `sample` and `encoder_hidden_states`. "
              "*measured dropped* = zeroed (or clipped) / all elements of those tensors in the modified model on "
              f"{drop['measure_files']} calibration files (timesteps "
              f"{', '.join(str(t) for t in drop['measure_timesteps'])})."),
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
    return lines + ["", f"**Verdict:** {result['verdicts']['drop']}", ""]


def _attention_lines(result: dict) -> list[str]:
    lines = ["## 2. Start-token (`<bos>`, key 0) share of cross-attention", "",
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
    return lines + ["", "Share per key (conditional rows, mean over layers): "
                    + ", ".join(f"k{j} {v:.3f}" for j, v in enumerate(result["attention_key_mean"]["cond"])), "",
                    "Share per key (unconditional rows, mean over layers): "
                    + ", ".join(f"k{j} {v:.3f}" for j, v in enumerate(result["attention_key_mean"]["uncond"])), "",
                    f"**Verdict:** {result['verdicts']['attention']}", ""]


def _axis_lines(result: dict) -> list[str]:
    lines = ["## 3. D_channel vs D_pixel (DGQ's axis choice) per layer type", "",
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
    return lines + ["", (f"All (excluding one-index axes): {dict(total)}. Left out (D of a one-index axis is 0 by "
                         f"construction): {', '.join(odd)}."), "", f"**Verdict:** {result['verdicts']['axis']}", "",
                    ("Plot: `outliers.png` (PSNR vs p per arm; start-token share per layer and per timestep; "
                     "D_pixel/D_channel per tensor by type; a strip of float / outlier / random / clip images at "
                     "the largest p)."), ""]


def markdown(result: dict) -> str:
    lines = _header_lines(result) + _drop_lines(result) + _attention_lines(result) + _axis_lines(result)
    return "\n".join(lines)


# --------------------------------------------------------------------------- verdicts

def _drop_verdict(result: dict) -> str:
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
    return "; ".join(clauses) + f". Float accuracy {float_accuracy:.2f}."


def _attention_verdict(att: list[dict]) -> str:
    share = {half: [a["start_share"][half] / a["uniform_share"] for a in att] for half in ("cond", "uncond")}
    if min(share["cond"]) > 2:
        head = "Reproduced: with a prompt, every cross-attention layer puts several times the uniform share on <bos>"
    elif max(share["cond"]) > 2:
        head = "Partly reproduced: with a prompt, some cross-attention layers concentrate on <bos>, others do not"
    else:
        head = "Not reproduced: with a prompt, <bos> draws about its uniform share or less"
    return (f"{head} (share on key 0 / uniform, conditional rows: {min(share['cond']):.2f}–"
            f"{max(share['cond']):.2f}× over {len(att)} layers; unconditional rows, empty prompt "
            f"`<bos> <eos> <pad>…`: {min(share['uncond']):.2f}–{max(share['uncond']):.2f}×).")


def _axis_verdict(types: dict) -> str:
    mixed = [n for n, r in types.items() if r["pixel"] and r["channel"]]
    pixel = [n for n, r in types.items() if r["pixel"] and not r["channel"]]
    channel = [n for n, r in types.items() if r["channel"] and not r["pixel"]]
    n_pixel, n_channel = sum(r["pixel"] for r in types.values()), sum(r["channel"] for r in types.values())
    return (f"D_d picks pixel for {n_pixel} and channel for {n_channel} tensors (one-index axes left out). "
            f"Pixel only: {', '.join(pixel) or 'none'}; channel only: {', '.join(channel) or 'none'}; "
            f"both: {', '.join(mixed) or 'none'}. "
            + ("Both kinds of layer exist, as in the paper." if n_pixel and n_channel and n_pixel >= 0.1 * n_channel
               else "Not as in the paper: channel-wise spread dominates almost everywhere; pixel-wise layers are "
                    "rare or absent in this model."))


def verdicts(result: dict) -> dict:
    return {"drop": _drop_verdict(result), "attention": _attention_verdict(result["attention"]),
            "axis": _axis_verdict(result["axis_by_type"])}


# --------------------------------------------------------------------------- plot

def _plot_drop(ax, result: dict) -> None:
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


def _plot_share_per_layer(ax, att: list[dict], labels: list[str]) -> None:
    x = np.arange(len(att))
    ax.bar(x - 0.2, [a["start_share"]["cond"] for a in att], 0.4, label="conditional rows")
    ax.bar(x + 0.2, [a["start_share"]["uncond"] for a in att], 0.4, label="unconditional rows")
    ax.axhline(att[0]["uniform_share"], color="k", ls="--", lw=1, label="uniform 1/L_k")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean attention share on key 0 (<bos>)")
    ax.set_title("2. start-token share per cross-attention layer")
    ax.legend(fontsize=7)


def _plot_share_per_timestep(ax, att: list[dict], labels: list[str]) -> None:
    for a, label in zip(att, labels):
        ts = [r["timestep"] for r in a["per_timestep"]]
        ax.plot(ts, [r["cond"] for r in a["per_timestep"]], "-", label=label)
    ax.axhline(att[0]["uniform_share"], color="k", ls="--", lw=1)
    ax.invert_xaxis()
    ax.set_xlabel("timestep (reversed: sampling order, noisiest on the left)")
    ax.set_ylabel("share on key 0, conditional rows")
    ax.set_title("2. start-token share per timestep")
    ax.legend(fontsize=6, ncol=2)


def _plot_axis(ax, result: dict) -> None:
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


def _plot_strip(ax, strip: list[tuple[str, np.ndarray]]) -> None:
    tiles = [np.concatenate([np.pad(img[0], 1, constant_values=1.0) for img in images], axis=1)
             for _, images in strip]
    ax.imshow(np.clip(np.concatenate(tiles, axis=0), -1, 1), cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([34 * k + 17 for k in range(len(strip))], [name for name, _ in strip], fontsize=8)
    ax.set_xticks([])
    ax.set_title("same prompts and seeds (digits 0–9)", fontsize=9)


def plot(result: dict, strip: list[tuple[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.75])
    _plot_drop(fig.add_subplot(grid[0, 0]), result)
    att = result["attention"]
    ax = fig.add_subplot(grid[0, 1])
    labels = [short(a["label"]) for a in att]
    _plot_share_per_layer(ax, att, labels)
    _plot_share_per_timestep(fig.add_subplot(grid[1, 0]), att, labels)
    _plot_axis(fig.add_subplot(grid[1, 1]), result)
    _plot_strip(fig.add_subplot(grid[2, :]), strip)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- output

def write_outputs(result: dict, strip: list[tuple[str, np.ndarray]], out: Path, started: float) -> str:
    """Write ``outliers.png``, ``outliers.json`` and ``outliers.md`` to ``out``; return the Markdown."""
    meta = result["meta"]
    meta["runtime_s"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    plot(result, strip, out / "outliers.png")
    meta["runtime_s"] = time.perf_counter() - started
    (out / "outliers.json").write_text(json.dumps(result, indent=1, default=float))
    text = markdown(result)
    (out / "outliers.md").write_text(text)
    return text
