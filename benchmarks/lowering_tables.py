"""Markdown, JSON and a latency chart for ``bench_lowering``'s rows."""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_tables import _cell

HEADER = ("| setting | recipe | PSNR dB | Δ vs split dB | denoiser SQNR dB | Δ SQNR vs split dB | int / quantized GEMMs | simulated | latency ms "
          "| × minmax | × float | size MB | size × minmax | compile s | peak MiB |")


def _label(row: dict) -> str:
    return row["recipe"] + (f" ({row['variant']})" if row.get("variant") else "")


def _delta(row: dict) -> str:
    """PSNR Δ vs the split reference, with the paired standard error over images where known."""
    cell = _cell(row, 'psnr_vs_split_db', '+.2f')
    if row.get("psnr_vs_split_se_db") is not None:
        cell += f" ± {row['psnr_vs_split_se_db']:.2f}"
    return cell


def table_row(row: dict) -> str:
    gemms = f"{row['integer_gemms']} / {row['quantized_gemms']}" if "integer_gemms" in row else "–"
    return (f"| {row['setting']} | {_label(row)} | {_cell(row, 'psnr_db', '.2f')} | {_delta(row)} "
            f"| {_cell(row, 'denoiser_sqnr_db', '.2f')} | {_cell(row, 'sqnr_vs_split_db', '+.2f')} | {gemms} | {_cell(row, 'simulated', 'd')} | {_cell(row, 'latency_ms', '.1f')} "
            f"| {_cell(row, 'latency_vs_minmax', '.2f')} | {_cell(row, 'latency_vs_float', '.2f')} "
            f"| {row['size_bytes'] / 1e6:.2f} | {_cell(row, 'size_vs_minmax', '.3f')} | {_cell(row, 'compile_s', '.0f')} "
            f"| {_cell(row, 'peak_rss_mib', '.0f')} |")


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Lowering benchmark ({meta['date']})", "",
             f"`{meta['command']}` on {meta['machine']}. Calibration: every {meta['calib_stride']}th row of each "
             f"timestep file. PSNR: final images vs the float model's, {meta['samples']} prompts/seeds, DDIM 25 "
             f"steps, guidance 4, every row sampled from its deployed model; Δ vs split ± the standard error of "
             f"the mean per-image difference (same seeds). Latency: median of {meta['runs']} "
             "denoiser calls on the first calibration batch, 1 thread, all rows of a model interleaved; × minmax "
             "is against minmax at the same bits in the same run. `simulated`: quantized tensors the target "
             "runs as plain ONNX ops (log2 attention here). Denoiser SQNR: one call's output vs float, pooled over "
             "every 3rd calibration file (no trajectory: 25 chained DDIM steps turn per-call differences of a few "
             "hundredths of a dB into about ±1 dB of final-image PSNR).", ""]
    for model in dict.fromkeys(r["model"] for r in results):
        lines += [f"## {model}", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
        lines += [table_row(r) for r in results if r["model"] == model]
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and "latency_vs_minmax" in r]
        labels = [f"{r['setting']}\n{_label(r)}" for r in rows]
        values = [r["latency_vs_minmax"] for r in rows]
        colors = ["tab:red" if v > 1.1 else "tab:blue" for v in values]
        ax.bar(range(len(rows)), values, color=colors)
        ax.axhline(1.1, color="gray", linestyle="--", linewidth=1, label="1.1 × minmax")
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
        ax.set_ylabel("latency × minmax (same bits, log scale)")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowering.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=str))
    text = markdown(results, meta)
    (out / "lowering.md").write_text(text + "\n")
    plot(results, out / "lowering.png")
    print(text)
