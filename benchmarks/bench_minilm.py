"""Benchmark qcompile against ONNX Runtime's own quantizers on all-MiniLM-L6-v2 (W8A8, CPU).

Every model is built from the same float export and the same calibration folder, then measured
the same way: compile wall time and peak RSS (each compile in a fresh 'spawn' child process),
size on disk, integer vs float GEMM kernels in ORT's optimized graph, SQNR/cosine against the
float model on the held-out folder, and latency with sessions of equal thread count, timed runs
interleaved across models. Writes ``minilm.json``, ``minilm.md`` and ``minilm.png`` to ``--out``.

Rows: ``float``; ``qcompile-<recipe>`` per recipe; ``ort-static`` (``quantize_static`` with the
same QDQ / per-channel / uint8-activation / int8-weight / MinMax settings and the same GEMM nodes,
ORT's default of also quantizing GEMM outputs); ``ort-static-inputs`` (the same, GEMM outputs
left float, so it quantizes the same tensors qcompile does); ``ort-dynamic`` (``quantize_dynamic``).

Usage: python benchmarks/bench_minilm.py [--out benchmarks/results] [--runs 30] [--threads 2]
       [--recipes minmax|all|NAME ...] [--warmup 5] [--batch 8] [--seq-len 128] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

# Heavy libraries (qcompiler, onnxruntime, matplotlib, rich) are imported inside functions: a
# 'spawn' child re-imports this module, and each compiler's child should load only what it uses.

#: ORT's op types that hold a weight GEMM; attention's activation x activation MatMuls are MatMuls
#: too, so both tools are also restricted to the exact GEMM nodes qcompile quantized.
GEMM_OP_TYPES = ["MatMul", "Gemm", "Conv"]
#: qcompile leaves MatMul/Gemm outputs float (they lower to MatMulIntegerToFloat / QGemm with float
#: output) and quantizes Conv outputs (for QLinearConv); this makes ORT quantize the same tensors.
FLOAT_OUTPUT_OP_TYPES = ["MatMul", "Gemm"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for json/md/png")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the quantized models (default: <minilm cache>/bench)")
    parser.add_argument("--recipes", nargs="+", default=["minmax"],
                        help="qcompile recipes to compile, or 'all' for every built-in recipe")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (at least 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model before timing")
    parser.add_argument("--threads", type=int, default=2, help="intra_op_num_threads of every session")
    parser.add_argument("--batch", type=int, default=8, help="latency batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="latency sequence length")
    args = parser.parse_args(argv)
    if args.runs < 20:  # p90 of fewer samples is little more than the single slowest run
        parser.error("--runs must be at least 20")
    from qcompiler.recipes import available_recipes

    known = available_recipes()
    args.recipes = list(known) if args.recipes == ["all"] else args.recipes
    unknown = [name for name in args.recipes if name not in known]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; available: {sorted(known)} or 'all'")
    return args


def stage(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --- compiling, one fresh child process per model ------------------------------------------------

def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _measured(prepare, compile_fn, args: tuple) -> dict:
    """In the child: import what the compiler needs, then time it and read the peak RSS."""
    prepare()
    baseline = _max_rss_mb()
    started = time.perf_counter()
    extra = compile_fn(*args)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _max_rss_mb(),
            "import_rss_mb": baseline, **(extra or {})}


def compile_in_child(prepare, compile_fn, *args) -> dict:
    """Run ``compile_fn(*args)`` in a new spawned interpreter so every compiler starts from zero."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measured, prepare, compile_fn, args).result()


def _import_qcompile() -> None:
    import onnxruntime  # noqa: F401  (qcompile asks ORT for its optimized graph at the end)

    import qcompiler.api  # noqa: F401
    import qcompiler.passes  # noqa: F401


def _import_ort_quantization() -> None:
    import onnxruntime.quantization  # noqa: F401

    import qcompiler.calibration.readers  # noqa: F401


def _qcompile(model: str, recipe: str, calib: str, output: str) -> dict:
    import qcompiler
    from qcompiler.api import CompileOptions

    result = qcompiler.quantize(model, recipe=recipe, calibration=calib, output=output,
                                options=CompileOptions(wbits=8, abits=8, progress=False))
    report = result.report
    return {"quantized_nodes": [r["node"] for r in report["quantized"] if r["role"] == "weight"],
            "quantized_gemms": report["quantized_gemms"], "warnings": result.warnings}


def _ort_static(model: str, output: str, nodes: list[str], calib: str, float_outputs: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from qcompiler.calibration.readers import NpzFolderReader

    # No quant_pre_process: its symbolic shape inference fails on this BERT export (docs/algorithms.md §9),
    # and quantize_static runs onnx shape inference itself.
    # ORT's defaults, spelled out so the settings are visible: asymmetric activations, symmetric weights.
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if float_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = FLOAT_OUTPUT_OP_TYPES
    quantize_static(model, output, NpzFolderReader(calib), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=GEMM_OP_TYPES, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)


def _ort_dynamic(model: str, output: str, nodes: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, output, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes)


def build_models(model: Path, calib: Path, work: Path, recipes: list[str]) -> tuple[list[dict], list[str]]:
    """Compile every row's model; returns rows with name, path, tool and compile measurements, and
    one line per recipe that refused the model (e.g. a diffusion-only recipe: no timestep input)."""
    from qcompiler.errors import QCompileError

    work.mkdir(parents=True, exist_ok=True)
    rows = [{"name": "float", "tool": "export", "path": model, "compile": None}]
    refused = []
    nodes = None
    for recipe in recipes:
        name = f"qcompile-{recipe}"
        stage(f"compile {name}")
        try:
            measured = compile_in_child(_import_qcompile, _qcompile, str(model), recipe, str(calib),
                                        str(work / f"{name}.onnx"))
        except QCompileError as error:
            refused.append(f"{name} refused the model: {error}")
            stage(refused[-1])
            continue
        recipe_nodes = measured.pop("quantized_nodes")
        nodes = nodes or recipe_nodes  # ORT quantizes the first recipe's GEMMs
        rows.append({"name": name, "tool": "qcompile", "path": work / f"{name}.onnx", "compile": measured})
    ort_jobs = [("ort-static", _ort_static, (str(calib), False)),
                ("ort-static-inputs", _ort_static, (str(calib), True)),
                ("ort-dynamic", _ort_dynamic, ())]
    for name, compile_fn, settings in ort_jobs:
        stage(f"compile {name} ({len(nodes)} GEMM nodes from qcompile's report)")
        output = work / f"{name}.onnx"
        measured = compile_in_child(_import_ort_quantization, compile_fn, str(model), str(output), nodes, *settings)
        rows.append({"name": name, "tool": "onnxruntime", "path": output, "compile": measured})
    return rows, refused


# --- measuring -----------------------------------------------------------------------------------

def size_on_disk(path: Path) -> int:
    data = Path(f"{path}.data")  # external data, if a model was saved with it
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def measure_static(rows: list[dict], float_path: Path, heldout: Path) -> None:
    """Size, ORT kernel counts and accuracy vs float for every row (in place)."""
    from qcompiler.evaluate import EvalOptions, evaluate
    from qcompiler.runtimes.ort import count_kernels

    for row in rows:
        stage(f"kernels + accuracy {row['name']}")
        row["size_bytes"] = size_on_disk(row["path"])
        row["kernels"] = count_kernels(row["path"]).as_dict()
        row["accuracy"] = (None if row["path"] == float_path else
                           evaluate(float_path, row["path"], heldout, EvalOptions(per_layer=False)))


def latency_feeds(heldout: Path, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """The first held-out file cut to ``batch`` x ``seq_len``."""
    from qcompiler.calibration.readers import NpzFolderReader

    first = next(iter(NpzFolderReader(heldout)))
    feeds = {name: value[:batch, :seq_len] for name, value in first.feeds.items()}
    if any(value.shape[:2] != (batch, seq_len) for value in feeds.values()):
        shapes = {name: value.shape for name, value in first.feeds.items()}
        raise SystemExit(f"{heldout}/{first.source}: shapes {shapes} are smaller than {batch} x {seq_len}")
    return feeds


def measure_latency(rows: list[dict], feeds: dict, threads: int, warmup: int, runs: int) -> None:
    """Median/p90 ms per row; timed runs are round-robin across models, start rotating each round."""
    from qcompiler.runtimes.ort import make_session

    sessions = [make_session(row["path"], threads=threads) for row in rows]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    samples = [[] for _ in rows]
    # Interleaving spreads load changes on a shared machine over every model alike; rotating the
    # start keeps any cache effect of "running right after model X" from favouring one model.
    for round_index in range(runs):
        for offset in range(len(rows)):
            index = (round_index + offset) % len(rows)
            started = time.perf_counter()
            sessions[index].run(None, feeds)
            samples[index].append((time.perf_counter() - started) * 1e3)
    for row, times in zip(rows, samples):
        row["latency_ms"] = {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)),
                             "samples": [round(t, 3) for t in times]}


def add_ratios(rows: list[dict], baseline: str) -> None:
    reference = next(row for row in rows if row["name"] == baseline)["latency_ms"]["median"]
    for row in rows:
        row["latency_ms"]["ratio"] = row["latency_ms"]["median"] / reference


def comparisons(rows: list[dict]) -> list[str]:
    """Each qcompile row against each ORT static row: SQNR difference, latency ratio, kernels."""
    lines = []
    ort_rows = [row for row in rows if row["name"].startswith("ort-static")]
    for ours in (row for row in rows if row["tool"] == "qcompile"):
        kernels, promised = ours["kernels"]["integer_gemms"], ours["compile"]["quantized_gemms"]
        lines.append(f"{ours['name']}: {kernels} of {promised} quantized GEMMs run as integer kernels")
        for theirs in ort_rows:
            delta = ours["accuracy"]["overall"]["sqnr_db"] - theirs["accuracy"]["overall"]["sqnr_db"]
            ratio = ours["latency_ms"]["median"] / theirs["latency_ms"]["median"]
            lines.append(f"{ours['name']} vs {theirs['name']}: overall SQNR {delta:+.2f} dB, "
                         f"median latency x{ratio:.3f}")
    return lines


# --- reporting -----------------------------------------------------------------------------------

def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def columns(rows: list[dict], baseline: str) -> list[tuple[str, object]]:
    """(header, row -> text) for the terminal and Markdown tables; accuracy columns per output."""
    outputs = next(row["accuracy"]["outputs"] for row in rows if row["accuracy"] is not None)

    def metric(row, output, key, digits):
        accuracy = row["accuracy"]
        if accuracy is None:
            return "ref"
        source = accuracy["overall"] if output is None else accuracy["outputs"][output]
        return _number(source[key], digits)

    def compile_(row, key, digits):
        return _number(row["compile"][key] if row["compile"] else None, digits)

    table = [("model", lambda row: row["name"]),
             ("compile s", lambda row: compile_(row, "seconds", 1)),
             ("peak RSS MB", lambda row: compile_(row, "peak_rss_mb", 0)),
             ("size MB", lambda row: f"{row['size_bytes'] / 1e6:.1f}"),
             ("int / float GEMMs", lambda row: f"{row['kernels']['integer_gemms']} / {row['kernels']['float_gemms']}")]
    for output in list(outputs) + [None]:
        label = output or "overall"
        table.append((f"SQNR dB {label}", lambda row, o=output: metric(row, o, "sqnr_db", 2)))
        table.append((f"cos {label}", lambda row, o=output: metric(row, o, "cosine", 4)))
    table += [("median ms", lambda row: f"{row['latency_ms']['median']:.1f}"),
              ("p90 ms", lambda row: f"{row['latency_ms']['p90']:.1f}"),
              (f"x {baseline}", lambda row: f"{row['latency_ms']['ratio']:.3f}")]
    return table


def print_table(rows: list[dict], baseline: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    spec = columns(rows, baseline)
    for index, (header, _) in enumerate(spec):
        # The last word on its own line keeps columns as narrow as their longest word.
        table.add_column("\n".join(header.rsplit(" ", 1)), justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(render(row) for _, render in spec))
    console = Console()
    # Piped output defaults to 80 columns, which would wrap every cell of a 14-column table.
    (console if console.is_terminal else Console(width=240)).print(table)


def machine(args: argparse.Namespace) -> dict:
    import onnxruntime

    import qcompiler

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2), "python": sys.version.split()[0],
            "onnxruntime": onnxruntime.__version__, "qcompile": qcompiler.__version__,
            "threads": args.threads, "command": "python " + shlex.join(sys.argv)}


def write_markdown(path: Path, rows: list[dict], baseline: str, info: dict, args, notes: list[str]) -> None:
    spec = columns(rows, baseline)
    lines = ["# all-MiniLM-L6-v2, W8A8: qcompile vs ONNX Runtime", "",
             f"Command: `{info['command']}`  ", f"Date (UTC): {info['date']}  ",
             f"Machine: {info['cpu_count']} CPUs (1-min load {info['load_average_1min_at_start']} at start), "
             f"Python {info['python']}, onnxruntime {info['onnxruntime']}, qcompile {info['qcompile']}  ",
             f"Latency: batch {args.batch} x {args.seq_len} tokens, intra_op_num_threads={args.threads}, "
             f"{args.warmup} warm-up runs, {args.runs} timed runs per model interleaved across models.  ",
             "Accuracy: against the float model on every held-out file; `ref` marks the reference.", "",
             "| " + " | ".join(header for header, _ in spec) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(spec) - 1)) + "|"]
    lines += ["| " + " | ".join(render(row) for _, render in spec) + " |" for row in rows]
    lines += ["", "## Comparisons", ""] + [f"- {note}" for note in notes]
    lines += ["", "Rows and settings: see `benchmarks/README.md`.", ""]
    path.write_text("\n".join(lines))


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_json(path: Path, rows: list[dict], baseline: str, info: dict, notes: list[str]) -> None:
    serialisable = [{**row, "path": _display(row["path"])} for row in rows]
    document = {"benchmark": "minilm", "machine": info, "latency_baseline": baseline,
                "rows": serialisable, "comparisons": notes}
    path.write_text(json.dumps(document, indent=1) + "\n")


def write_chart(path: Path, rows: list[dict], title: str) -> None:
    """Overall SQNR per quantized model and median latency (whisker up to p90) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [row for row in rows if row["accuracy"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([r["name"] for r in quantized], [r["accuracy"]["overall"]["sqnr_db"] for r in quantized])
    left.set_ylabel("overall SQNR vs float (dB, higher is better)")
    medians = [r["latency_ms"]["median"] for r in rows]
    upper = [r["latency_ms"]["p90"] - m for r, m in zip(rows, medians)]
    right.bar([r["name"] for r in rows], medians, yerr=[[0] * len(rows), upper], capsize=4)
    right.set_ylabel("median latency (ms, whisker: p90)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
        plt.setp(axis.get_xticklabels(), ha="right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qcompiler.exporters.minilm import ensure_minilm

    stage("model + data (exported on first use)")
    model = ensure_minilm()
    calib, heldout = model.parent / "calib", model.parent / "heldout"
    rows, refused = build_models(model, calib, args.work or model.parent / "bench", args.recipes)
    measure_static(rows, model, heldout)
    stage(f"latency: {len(rows)} models x ({args.warmup} warm-up + {args.runs} interleaved timed runs)")
    measure_latency(rows, latency_feeds(heldout, args.batch, args.seq_len), args.threads, args.warmup, args.runs)
    compiled = [r["name"] for r in rows if r["tool"] == "qcompile"]
    baseline = "qcompile-minmax" if "qcompile-minmax" in compiled else compiled[0]
    add_ratios(rows, baseline)
    notes, info = comparisons(rows) + refused, machine(args)
    title = f"all-MiniLM-L6-v2 W8A8, {info['cpu_count']} CPUs, {args.threads} threads, ORT {info['onnxruntime']}"
    print_table(rows, baseline, title)
    for note in notes:
        print(note)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "minilm.json", rows, baseline, info, notes)
    write_markdown(args.out / "minilm.md", rows, baseline, info, args, notes)
    write_chart(args.out / "minilm.png", rows, title)
    stage(f"wrote {args.out / 'minilm.json'}, {args.out / 'minilm.md'}, {args.out / 'minilm.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
