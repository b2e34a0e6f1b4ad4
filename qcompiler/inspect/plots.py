"""PNG plots of an inspect report: channel abs-max heat maps, worst histograms, outlier counts, attention mass.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot), so
plotting never touches a global backend or leaves figures open in the caller's process.
Each file is written to a temporary name and renamed: a failed plot leaves no partial PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qcompiler.calibration.statistics import TensorStats
from qcompiler.errors import QCompileError

DPI = 80
#: Heat maps are drawn for the widths with the most tensors (one panel each), at most this many.
MAX_WIDTHS = 3
#: How many of the highest max/mean tensors get a histogram.
WORST = 6
#: Histograms are re-binned to this many bins: 2048 fine bins make an unreadable comb.
PLOT_BINS = 128


def _tail(label: str, width: int = 44) -> str:
    """The end of a label (it names the layer and op); a cut is marked with an ellipsis."""
    return label if len(label) <= width else "…" + label[-(width - 1):]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    staging = path.with_name(f".{path.stem}.tmp.png")
    try:
        figure.savefig(staging, dpi=DPI)
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise QCompileError(f"{path}: could not write the plot ({exc.strerror or exc})") from None
    return path


def channel_heatmap(report: dict, path: Path) -> Path:
    """Per-layer channel abs-max (log colour), one panel per channel width; outlier channels ticked."""
    from matplotlib.colors import LogNorm

    widths: dict[int, list[dict]] = {}
    for row in report["activations"]:
        widths.setdefault(row["channels"], []).append(row)
    chosen = sorted(widths, key=lambda w: (-len(widths[w]), -w))[:MAX_WIDTHS]
    heights = [max(1.5, 0.16 * len(widths[w]) + 0.8) for w in chosen]
    figure = _figure(11, sum(heights) + 0.6)
    axes = figure.subplots(len(chosen), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, width in zip(axes, chosen):
        rows = widths[width]
        grid = np.array([row["channel_absmax"] for row in rows], dtype=float)
        high = max(float(grid.max()), 1e-30)
        # Three decades below the largest value: a dead channel (max ≈ 0) would otherwise
        # stretch the colour scale over 30 decades and wash out every real difference.
        low = high * 1e-3
        image = ax.imshow(np.clip(grid, low, high), aspect="auto", interpolation="nearest", cmap="magma",
                          norm=LogNorm(vmin=low, vmax=high))
        ax.set_yticks(range(len(rows)), [_tail(row["label"]) for row in rows], fontsize=6)
        ticks = sorted({channel for row in rows for channel, _ in row["outliers"]["channels"]})[:16]
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=90)
        ax.set_xlabel(f"channel (width {width}; ticks: channels with values above τ·mean|h|)", fontsize=8)
        figure.colorbar(image, ax=ax, label="max |h| per channel", pad=0.01)
    figure.suptitle("Channel abs-max per layer", fontsize=10)
    return _save(figure, path)


def worst_histograms(report: dict, stats: dict[str, TensorStats], path: Path) -> Path:
    """|h| histograms (log counts) of the tensors with the highest max/mean, with the τ·mean|h| line."""
    rows = sorted((r for r in report["activations"] if r["max_mean_ratio"]), key=lambda r: -r["max_mean_ratio"])[:WORST]
    columns = 3
    lines = max(1, -(-len(rows) // columns))
    figure = _figure(11, 2.6 * lines)
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax, row in zip(axes, rows):
        tensor = stats[row["tensor"]]
        counts = tensor.hist_counts.reshape(PLOT_BINS, -1).sum(axis=1) if tensor.hist_counts.size % PLOT_BINS == 0 \
            else tensor.hist_counts
        edges = np.linspace(0.0, float(tensor.hist_edges[-1]), counts.size + 1)
        ax.stairs(np.maximum(counts, 0.5), edges, fill=True, alpha=0.7)
        ax.set_yscale("log")
        ax.axvline(row["threshold"], color="crimson", linestyle="--", linewidth=1,
                   label=f"τ·mean|h| = {row['threshold']:.3g}")
        ax.set_title(f"{_tail(row['label'])}\nmax/mean {row['max_mean_ratio']:.1f}, "
                     f"{row['outliers']['total']} outliers", fontsize=7)
        ax.set_xlabel("|h|", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    figure.suptitle("Histograms of |h| for the highest max/mean tensors", fontsize=10)
    return _save(figure, path)


def outlier_counts(report: dict, path: Path) -> Path:
    """Outliers per tensor (log scale) above, max/mean per tensor with the τ line below."""
    from matplotlib.patches import Patch

    rows = report["activations"]
    colors = {"gemm_input": "tab:blue", "norm_output": "tab:orange", "residual_sum": "tab:green"}
    x = np.arange(len(rows))
    figure = _figure(max(8, 0.22 * len(rows) + 2), 6)
    top, bottom = figure.subplots(2, 1, sharex=True)
    color = [colors[row["roles"][-1]] for row in rows]
    top.bar(x, [row["outliers"]["total"] for row in rows], color=color)
    top.set_yscale("symlog", linthresh=1)
    top.set_ylabel("values > τ·mean|h|", fontsize=8)
    bottom.bar(x, [row["max_mean_ratio"] or 0 for row in rows], color=color)
    bottom.axhline(report["config"]["tau"], color="crimson", linestyle="--", linewidth=1, label="τ")
    bottom.set_ylabel("max|h| / mean|h|", fontsize=8)
    bottom.set_xticks(x, [_tail(row["label"], 36) for row in rows], rotation=90, fontsize=6)
    handles = [Patch(color=c, label=role) for role, c in colors.items()]
    bottom.legend(handles=handles + bottom.get_legend_handles_labels()[0], fontsize=7)
    figure.suptitle(f"Activation outliers per layer (τ = {report['config']['tau']:g})", fontsize=10)
    return _save(figure, path)


def attention_mass(report: dict, path: Path) -> Path:
    """Mean head-averaged mass per key position (heat map) and the start-token share per block (bars)."""
    from matplotlib.colors import LogNorm

    sites = report["attention"]
    keys = max(len(site["mean_mass"]) for site in sites)
    grid = np.full((len(sites), keys), np.nan)
    for index, site in enumerate(sites):
        grid[index, :len(site["mean_mass"])] = site["mean_mass"]
    figure = _figure(11, max(2.5, 0.3 * len(sites) + 1.5))
    left, right = figure.subplots(1, 2, width_ratios=[3, 1])
    positive = grid[np.isfinite(grid) & (grid > 0)]
    image = left.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=max(positive.min(), 1e-4), vmax=positive.max()) if positive.size else None)
    labels = [f"{_tail(site['label'], 36)} ({site['kind']})" for site in sites]
    left.set_yticks(range(len(sites)), labels, fontsize=6)
    left.set_xlabel("key position j   (Â_j = Σ_queries mean_heads A; blank: never attended)", fontsize=8)
    figure.colorbar(image, ax=left, label="mean Â_j", pad=0.01)
    y = np.arange(len(sites))
    right.barh(y, [site["start_token_mass"]["mean"] for site in sites], color="tab:purple", label="mean")
    right.scatter([site["start_token_mass"]["max"] for site in sites], y, color="black", marker="|", s=80, label="max")
    right.axvline(report["config"]["attention_fraction"], color="crimson", linestyle="--", linewidth=1,
                  label="outlier fraction")
    right.set_yticks(y, [""] * len(sites))
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("share of attention on key 0", fontsize=8)
    right.legend(fontsize=6)
    figure.suptitle("Attention mass per key", fontsize=10)
    return _save(figure, path)


def write_plots(report: dict, stats: dict[str, TensorStats], folder: str | os.PathLike) -> list[Path]:
    """Every plot into ``folder`` (created if missing); returns the files written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QCompileError(f"{folder}: cannot create the plot folder ({exc.strerror or exc})") from None
    written = [channel_heatmap(report, folder / "channel_absmax.png"),
               worst_histograms(report, stats, folder / "histograms.png"),
               outlier_counts(report, folder / "outlier_counts.png")]
    if report["attention"]:
        written.append(attention_mass(report, folder / "attention_mass.png"))
    return written
