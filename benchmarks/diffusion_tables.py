"""Tables (Markdown), JSON and a PSNR chart for ``bench_diffusion``'s rows."""

from __future__ import annotations

import json
from pathlib import Path

HEADER = ("| setting | recipe | PSNR dB | SSIM | accuracy | Fréchet (real) | Fréchet (vs float) | int / float GEMMs "
          "| latency ms (× float) | compile s | peak MiB | images from |")

#: The setting of ``diffusion_rows.ablation_rows`` (DGQ's attention / K / per-timestep ablation).
ABLATION_SETTING = "W8A8"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "–" if value is None else format(value, fmt)


def table_row(row: dict, label: str) -> str:
    gemms = f"{row['integer_gemms']} / {row['float_gemms']}" if "integer_gemms" in row else "–"
    latency = (f"{row['latency_ms']:.1f} (×{row['latency_vs_float']:.2f})" if "latency_ms" in row else "–")
    return (f"| {row['setting']} | {label} | {_cell(row, 'psnr_db', '.2f')} | {_cell(row, 'ssim', '.4f')} "
            f"| {_cell(row, 'accuracy', '.3f')} | {_cell(row, 'frechet', '.1f')} | {_cell(row, 'frechet_vs_float', '.2f')} "
            f"| {gemms} | {latency} | {_cell(row, 'compile_s', '.0f')} | {_cell(row, 'peak_rss_mib', '.0f')} "
            f"| {row.get('images_from', '–')} |")


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Diffusion benchmark ({meta['date']})", "", (f"`{meta['command']}` on {meta['machine']}; "
             f"{meta['samples']} images per row (seeds 0..{meta['samples'] - 1}), DDIM {meta['steps']} steps, "
             f"guidance {meta['guidance']}. PSNR/SSIM: final images vs the float model's; accuracy: the MNIST "
             "classifier recognises the prompted digit; Fréchet: classifier features vs 500 real held-out "
             "digits / vs the float samples. Latency: one denoiser call on the first calibration batch "
             "(16 prompts × both guidance halves), "
             "1 thread, rows interleaved; × is relative to the float model in the same run."), ""]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        lines += [f"## {model}", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
        lines += [table_row(r, r["recipe"]) for r in rows if not r.get("variant")]
        ablation = [r for r in rows
                    if r.get("variant") and r["recipe"] == "dgq" and r["setting"] == ABLATION_SETTING]
        if ablation:
            lines += ["", f"### {model}: DGQ ablation", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
            base = [r for r in rows if r["recipe"] == "dgq" and not r.get("variant")
                    and r["setting"] == ABLATION_SETTING]
            lines += [table_row(r, "dgq (K=16 default, log2, start token exact)") for r in base]
            lines += [table_row(r, f"dgq {r['variant']}") for r in ablation]
        variants = [r for r in rows if r.get("variant") and r not in ablation]
        if variants:
            lines += ["", f"### {model}: other variants", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
            lines += [table_row(r, f"{r['recipe']} {r['variant']}") for r in variants]
        checks = [r for r in rows if "split_vs_simulate_psnr_db" in r]
        if checks:
            lines += ["", ("DGQ images come from the `--channel-groups simulate` twin. On the first images the "
                      "deployed split model drew (same seeds):"), "",
                      "| row | images | split vs simulate PSNR dB | max abs Δ | split vs float dB | simulate vs float dB |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['row']} | {r.get('check_samples', '–')} | {r['split_vs_simulate_psnr_db']:.2f} "
                      f"| {r['split_vs_simulate_max_abs']:.3f} | {r['split_psnr_db_first']:.2f} "
                      f"| {r['simulate_psnr_db_first']:.2f} |" for r in checks]
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results if r.get("setting") != "float" and not r.get("variant")]
    models = list(dict.fromkeys(r["model"] for r in main))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in main if r["model"] == model]
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        recipes = list(dict.fromkeys(r["recipe"] for r in rows))
        width = 0.8 / len(recipes)
        for i, recipe in enumerate(recipes):
            values = [next((r["psnr_db"] for r in rows if r["setting"] == s and r["recipe"] == recipe), 0)
                      for s in settings]
            ax.bar([j + i * width for j in range(len(settings))], values, width, label=recipe)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
        ax.set(ylabel="PSNR vs float (dB)", title=f"{model}: final images vs float")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results: list[dict], meta: dict, out: Path, name: str = "diffusion") -> None:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    text = markdown(results, meta)
    (out / f"{name}.md").write_text(text)
    plot(results, out / f"{name}.png")
    print(text)
