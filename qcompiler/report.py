"""The compile report: JSON beside the output model and a readable summary for the terminal."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from qcompiler.graph import model_weight_bytes


def build_report(recipe, settings, ctx, pass_records, float_model, output_path: Path, source: str,
                 compile_seconds: float, target: str, kernels) -> dict:
    """Everything a person needs to judge a compile: what ran, what got quantized how, what it costs.

    ``kernels`` is the target's count of integer and float GEMMs in its runtime's optimized graph."""
    weight_records = [r for r in ctx.records if r.role == "weight"]
    size_after = output_path.stat().st_size
    data_file = Path(f"{output_path}.data")
    if data_file.exists():
        size_after += data_file.stat().st_size
    return {
        "qcompile_version": __import__("qcompiler").__version__,
        "source": source,
        "output": str(output_path),
        "recipe": {"name": recipe.name, "description": recipe.description, "steps": recipe.describe()},
        "settings": {"wbits": settings.wbits, "abits": settings.abits, "block_size": settings.block_size},
        "calibration_samples": sum(batch.batch_size for batch in ctx.calibration),
        # On a dask cluster: the scheduler, workers, and per capture the shards and samples merged.
        "calibration_cluster": ctx.cluster.summary() if ctx.cluster is not None else None,
        "passes": [record.as_dict() for record in pass_records],
        "compile_seconds": round(compile_seconds, 3),
        "quantized": [record.as_dict() for record in ctx.records],
        "lowering_counts": dict(Counter(record.lowering for record in ctx.records)),
        "quantized_gemms": len(weight_records),
        "target": target,
        "simulated": _simulated(ctx.records),
        "integer_kernels": kernels.as_dict(),
        "fallbacks": list(ctx.fallbacks),
        # mixed_precision: the budget, each weight's sensitivity, and the weights kept at 8 bits.
        "mixed_precision": ctx.mixed_precision,
        "size_bytes": {"before": model_weight_bytes(float_model) + _graph_bytes(float_model), "after": size_after},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far, from the OS (``getrusage``; None where unavailable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def _simulated(records) -> list[dict]:
    """What the target does not run as it would deploy it: one entry per simulated record (plain
    ONNX ops, or sub-8-bit codes in a narrowed 8-bit container: accuracy simulated, kernel int8)."""
    entries = []
    for r in records:
        if r.lowering.startswith("simulated"):
            entries.append({"node": r.node, "tensor": r.tensor, "lowering": r.lowering,
                            **({"reason": r.details["reason"]} if "reason" in r.details else {})})
        elif r.details.get("narrowed_container"):
            entries.append({"node": r.node, "tensor": r.tensor,
                            "lowering": "simulated (narrowed int8 container)", "kernel": r.lowering})
    return entries


def _graph_bytes(model) -> int:
    return sum(len(n.SerializeToString()) for n in model.graph.node)


def check_integer_kernels(recipe, report: dict) -> list[str]:
    """A recipe that promises integer kernels and gets fewer than it quantized says so."""
    promised = report["quantized_gemms"]
    got = report["integer_kernels"]["integer_gemms"]
    warnings = []
    if recipe.integer_kernels and got < promised:
        warnings.append(f"recipe '{recipe.name}' quantized {promised} GEMMs but target '{report['target']}' runs "
                        f"only {got} as integer "
                        f"kernels (ops: {report['integer_kernels']['op_types']})")
    warnings += _partial_sum_cost(report)
    report["warnings"] = warnings
    return warnings


def _partial_sum_cost(report: dict) -> list[str]:
    """Q-DiT's integer form writes G sums per output (``lowering/dynamic_groups.py``): say what that costs."""
    groups = [record["partial_sums_per_output"] for record in report["quantized"] if "partial_sums_per_output" in record]
    if not groups or max(groups) < 2:
        return []
    return [f"{len(groups)} Linears run Q-DiT's group-wise integer GEMMs, which write {min(groups)}–{max(groups)} "
            f"partial sums per output (mean {np.mean(groups):.1f}) to be scaled and summed in float: on ONNX "
            "Runtime's CPU each costs about that many int8 GEMMs and can run slower than float (larger groups "
            "cost less; --dynamic-groups simulate runs fake-quantized float GEMMs instead)"]


def write_report(report: dict, path: Path) -> Path:
    """Atomic write: a temporary file beside the target, then rename."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(report, indent=2, default=float))
    os.replace(staging, path)
    return path


def _print_mixed_precision(console, mixed: dict | None) -> None:
    """The weights ``mixed_precision`` kept at 8 bits, with the sensitivity that put them there."""
    if not mixed:
        return
    console.print(f"mixed precision: {len(mixed['kept_at_8'])} of {len(mixed['layers'])} weights kept at W8 "
                  f"({100 * mixed['w8_share']:.1f}% of {mixed['weight_bytes']['total']:,} weight bytes; budget "
                  f"{100 * mixed['w8_budget']:g}%, order {mixed['order']}); sensitivity = {mixed['sensitivity']}")
    for layer in mixed["kept_at_8"]:
        console.print(f"  - {layer['node']}: S = {layer['sensitivity']:.3g}, {layer['params']:,} weights")


def format_summary(report: dict) -> str:
    """A readable summary table (rich) of a compile report."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=110)
    table = Table(title=f"qcompile {report['recipe']['name']} W{report['settings']['wbits']}"
                        f"A{report['settings']['abits']}: {report['source']}")
    table.add_column("pass")
    table.add_column("seconds", justify="right")
    table.add_column("peak RSS GiB", justify="right")
    table.add_column("changed")
    table.add_column("notes")
    for record in report["passes"]:
        rss = record.get("peak_rss_bytes")
        table.add_row(record["name"], f"{record['seconds']:.2f}", f"{rss / 2**30:.2f}" if rss else "–",
                      str(record["modified"]), "; ".join(record["notes"]))
    console.print(table)
    kernels = report["integer_kernels"]
    console.print(f"target: {report['target']}   quantized GEMMs: {report['quantized_gemms']}   integer kernels in "
                  f"the runtime's optimized graph: {kernels['integer_gemms']}   float GEMMs left: "
                  f"{kernels['float_gemms']}")
    simulated = Counter(entry["lowering"] for entry in report.get("simulated", []))
    console.print("simulated: " + (", ".join(f"{n} × {kind}" for kind, n in simulated.items()) or "nothing"))
    console.print(f"lowering: {report['lowering_counts']}")
    size = report["size_bytes"]
    console.print(f"size: {size['before'] / 1e6:.2f} MB -> {size['after'] / 1e6:.2f} MB   calibration samples: "
                  f"{report['calibration_samples']}   compile: {report['compile_seconds']:.1f} s"
                  + (f"   peak RSS: {report['peak_rss_bytes'] / 2**30:.2f} GiB" if report.get("peak_rss_bytes") else ""))
    _print_mixed_precision(console, report.get("mixed_precision"))
    if report["fallbacks"]:
        console.print(f"explicit fallbacks ({len(report['fallbacks'])}, each an elementwise op at run time):")
        for fallback in report["fallbacks"]:
            console.print(f"  - {fallback}")
    for warning in report.get("warnings", []):
        console.print(f"[bold red]warning:[/] {warning}")
    return console.export_text()
