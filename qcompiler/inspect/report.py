"""The inspect report: JSON with every number (written atomically) and the tables printed to the terminal."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from qcompiler.errors import QCompileError

#: Per-index arrays (channel abs-max, row/column ratios, mass per key) keep 4 significant digits
#: (0.05% relative): enough for a plot or a ranking, and it keeps MiniLM's JSON near 0.4 MB.
#: Scalars keep full precision.
ARRAY_DIGITS = 4
#: How many items a terminal cell lists (the JSON lists all).
CELL_ITEMS = 3


def _plain(value, in_array: bool = False):
    """JSON-safe values: non-finite floats become null, array floats are rounded (ARRAY_DIGITS)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{ARRAY_DIGITS}g}") if in_array else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        numeric = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)
        return [_plain(item, numeric) for item in value]
    return value


def _dumps(value, indent: int = 0) -> str:
    """Indented JSON whose lists of scalars stay on one line (a 384-value array is one line, not 384)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(f"{inner}{_dumps(item, indent + 1)}" for item in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":") if isinstance(value, list) else (", ", ": "))


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` to ``path`` via a temporary file and a rename: no partial file on failure."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        staging.write_text(_dumps(_plain(report)) + "\n", encoding="utf-8")
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise QCompileError(f"{path}: could not write the JSON report ({exc.strerror or exc})") from None
    return path


def _short(label: str, width: int = 46) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def _label_column(table, name: str) -> None:
    """The first column: a layer name, never wrapped (``_short`` keeps its end, which names the layer)."""
    table.add_column(name, no_wrap=True, min_width=46)


def _pairs(pairs: list[list[int]], prefix: str = "") -> str:
    text = ", ".join(f"{prefix}{index}×{count}" for index, count in pairs[:CELL_ITEMS])
    return text + (" …" if len(pairs) > CELL_ITEMS else "")


def _db(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _tables(report: dict):
    from rich.table import Table

    config = report["config"]
    acts = Table(title=f"Activation outliers: |h| > τ·mean|h| (τ = {config['tau']:g}), "
                       f"{report['calibration']['samples']} samples", title_justify="left")
    _label_column(acts, "tensor")
    for column in ("role", "max/mean", "outliers", "channels", "positions", "tokens", "D_ch", "D_px", "DGQ"):
        acts.add_column(column, justify="left" if column in ("role", "channels", "positions", "tokens") else "right")
    roles = {"gemm_input": "in", "norm_output": "norm", "residual_sum": "sum"}
    for row in report["activations"]:
        outliers, dgq = row["outliers"], row["dgq"]
        acts.add_row(_short(row["label"]), "+".join(roles[r] for r in row["roles"]),
                     f"{row['max_mean_ratio']:.1f}" if row["max_mean_ratio"] else "—", str(outliers["total"]),
                     _pairs(outliers["channels"], "c"), _pairs(outliers["positions"], "p"),
                     _pairs(outliers["token_ids"], "id"), _db(dgq["D_channel"]), _db(dgq["D_pixel"]), dgq["axis"])
    yield acts

    if report["systematic_channels"]:
        systematic = Table(title="Systematic channels (outliers in ≥ "
                                 f"{config['min_recurrence']} tensors of one width)", title_justify="left")
        for column in ("width", "channel", "tensors", "outliers", "where"):
            systematic.add_column(column, justify="left" if column == "where" else "right")
        for item in report["systematic_channels"]:
            where = ", ".join(_short(hit["label"], 30) for hit in item["where"][:CELL_ITEMS])
            systematic.add_row(str(item["width"]), str(item["channel"]), str(item["tensors"]), str(item["outliers"]),
                               where + (" …" if len(item["where"]) > CELL_ITEMS else ""))
        yield systematic

    yield _weight_table(report)
    if report["attention"]:
        yield _attention_table(report)
    yield _advice_table(report)


def _weight_table(report: dict):
    from rich.table import Table

    rows = [w for w in report["weights"] if w["outliers"]["total"] or w["flagged_input_channels"]]
    title = "Weight outliers: |W_oi| > τ·mean_i|W_o·|; max|W|/mean|W| per row (out) and column (in)"
    if not rows:  # nothing crosses τ: show where the ratios are highest instead
        rows = sorted(report["weights"], key=lambda w: -w["column_ratio"]["max"])[:5]
        title += " — none above τ; highest column ratios"
    table = Table(title=title, title_justify="left")
    _label_column(table, "layer")
    for column in ("row ratio (ch)", "column ratio (ch)", "outliers", "in channels", "= act. outlier",
                   "out = systematic"):
        table.add_column(column, justify="right")
    for w in rows:
        flagged = ", ".join(f"{f['channel']} (#{f['column_rank']})" for f in w["flagged_input_channels"]) or "—"
        table.add_row(_short(w["label"]), f"{w['row_ratio']['max']:.1f} ({w['row_ratio']['channel']})",
                      f"{w['column_ratio']['max']:.1f} ({w['column_ratio']['channel']})", str(w["outliers"]["total"]),
                      _pairs(w["outliers"]["input_channels"], "c"), flagged,
                      ", ".join(map(str, w["flagged_output_channels"])) or "—")
    return table


def _attention_table(report: dict):
    from rich.table import Table

    fraction = report["config"]["attention_fraction"]
    table = Table(title=f"Attention outliers: keys with head-averaged mass summed over queries ≥ {fraction:g}·L",
                  title_justify="left")
    _label_column(table, "softmax")
    for column in ("kind", "start-token mass", "max", "outlier keys/sample", "key positions", "sinks", "tokens"):
        table.add_column(column, justify="left" if column in ("key positions", "tokens") else "right")
    for site in report["attention"]:
        table.add_row(_short(site["label"]), site["kind"], f"{site['start_token_mass']['mean']:.3f}",
                      f"{site['start_token_mass']['max']:.3f}", f"{site['outlier_keys_per_sample']:.2f}",
                      _pairs(site["outlier_keys"], "p"), ", ".join(map(str, site["sink_positions"])) or "—",
                      _pairs(site["token_ids"], "id"))
    return table


def _advice_table(report: dict):
    from rich.table import Table

    rows = report["recommendations"]
    target = rows[0]["target_db"] if rows else 0.0
    table = Table(title=f"Predicted GEMM-output SQNR (dB) at W{report['config']['wbits']}A{report['config']['abits']}"
                        f" and the treatment (target {target:.1f} dB)", title_justify="left")
    _label_column(table, "GEMM input")
    for column in ("readers", "per tensor", "smoothquant", "osplus", "groups ch", "groups px", "treatment"):
        table.add_column(column, justify="left" if column == "treatment" else "right")
    for row in rows:
        sqnr = row["sqnr_db"]
        treatment = row["treatment"].replace("_", " ") + (f" ({row['variant']})" if row["variant"] else "")
        table.add_row(_short(row["label"]), str(len(row["consumers"])), _db(sqnr["per_tensor"]),
                      _db(sqnr["smoothquant"]), _db(sqnr["osplus"]), _db(sqnr["groups_channel"]),
                      _db(sqnr["groups_pixel"]), treatment)
    return table


def make_console():
    """A rich console: the terminal's width, or 150 columns into a pipe or file (rich would assume 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


def print_summary(report: dict, console=None) -> None:
    """The tables, then the recipe suggestion and the timing, on a rich console."""
    console = console or make_console()
    for table in _tables(report):
        console.print(table)
    recipe = report["recipe"]
    console.print(f"[bold]suggested recipe: {recipe['suggested']}[/bold] — {recipe['reason']}")
    if recipe["keep_higher_precision"]:
        console.print("keep in higher precision: " + ", ".join(recipe["keep_higher_precision"]))
    if recipe["attention_note"]:
        console.print(recipe["attention_note"])
    if not report["passes_agree"]:
        console.print("[yellow]warning: max|h| differed between the two passes (non-deterministic runtime); "
                      "counts of values within rounding of τ·mean|h| may be off[/yellow]")
    timing = report["timing_s"]
    console.print(f"inspected {len(report['activations'])} activations, {len(report['weights'])} weights, "
                  f"{len(report['attention'])} attention blocks in {timing['total']:.1f} s "
                  f"(pass 1 {timing['pass1']:.1f} s, pass 2 {timing['pass2']:.1f} s)")
