"""Per-timestep and TDQ tables on ORT's CPU: integer vs simulated lowering, latency and kernels side by side.

For each zoo model, the per-timestep lookup (``dgq --per-timestep``) with one group per activation and
with DGQ's groups, each lowered three ways (``--timestep-groups simulate|auto|integer``), next to the
float model and static ``minmax`` / ``dgq``; ``--tdq`` adds ``minmax --tdq`` (auto and simulate; its
MLPs train for minutes per compile). Per row: integer / float GEMMs in ORT's optimized graph, file
size, median latency of one denoiser call on the first calibration batch (1 thread, rows interleaved,
float first), the RMS output error against float and the RMS difference to the same tables lowered
"simulate". The lowerings compute the same codes and the same integer products; they differ in float
rounding, which flips a code now and then, and later layers carry each flip on. For scale, each
"simulate" row's own column holds the same model run with ORT's graph optimizations off (fusions
change only float rounding too).

Usage: python benchmarks/bench_timestep_lowering.py [--models unet dit] [--runs 10] [--no-latency]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diffusion import MODELS, calibration, compile_row, measure_latency, models_dir  # noqa: E402
from diffusion_rows import Row  # noqa: E402

LOWERINGS = ("simulate", "auto", "integer")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "dit"], choices=sorted(MODELS))
    parser.add_argument("--setting", default="w8a8")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per row (interleaved)")
    parser.add_argument("--tdq", action="store_true", help="also minmax --tdq (auto, simulate)")
    parser.add_argument("--no-latency", action="store_true", help="compile and compare only")
    parser.add_argument("--work", type=Path, default=Path("build/bench_timestep_lowering"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def rows_for(setting: str, tdq: bool) -> list[tuple[str, str | None, Row]]:
    """(label, lowering or None for static rows, compiled row)."""
    w, a, one = int(setting[1]), int(setting[3]), ("--threads", "1")
    rows = [("minmax", None, Row("minmax", w, a, "", one)), ("dgq", None, Row("dgq", w, a, "", one))]
    for lowering in LOWERINGS:
        rows.append(("lookup, 1 group", lowering, Row("dgq", w, a, f"pt1-{lowering}", (
            "--per-timestep", "--groups", "1", "--timestep-groups", lowering, *one))))
        rows.append(("lookup, DGQ groups", lowering, Row("dgq", w, a, f"pt-{lowering}", (
            "--per-timestep", "--timestep-groups", lowering, *one))))
    if tdq:
        for lowering in ("simulate", "auto"):
            rows.append(("minmax+tdq", lowering, Row("minmax", w, a, f"tdq-{lowering}", (
                "--tdq", "--timestep-groups", lowering, *one))))
    return rows


def first_batch(calib: Path, model: Path) -> dict[str, np.ndarray]:
    """The feeds of the first calibration batch (the one ``measure_latency`` times)."""
    import onnx

    from qcompiler.calibration.readers import load_calibration

    return load_calibration(calib, onnx.load(str(model), load_external_data=False))[0].feeds


def outputs(path: Path, feeds: dict[str, np.ndarray], optimize: bool = True) -> np.ndarray:
    """The denoiser output on ``feeds`` (1 thread)."""
    from qcompiler.runtimes.ort import make_session

    session = make_session(path, threads=1, optimize=optimize)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def compare(results: list[dict], calib: Path, model: Path) -> None:
    """Per row: RMS error vs float (the first row), RMS difference to its "simulate" twin; for the
    simulate rows the same model with ORT's graph optimizations off (float rounding alone) as the
    floor to read it by. One calibration batch, each model run once (twice for the floor)."""
    feeds = first_batch(calib, model)
    by_key = {(r["row"], r["lowering"]): r for r in results}
    cache = {r["deployed"]: outputs(Path(r["deployed"]), feeds) for r in results}
    reference = cache[results[0]["deployed"]]
    for r in results:
        r["rms_vs_float"] = rms(cache[r["deployed"]] - reference)
        twin = by_key.get((r["row"], "simulate"))
        if twin is None:
            continue
        if r is twin:
            unoptimized = outputs(Path(r["deployed"]), feeds, optimize=False)
            r["rms_vs_simulate"] = rms(cache[r["deployed"]] - unoptimized)
            r["control"] = "ORT optimizations off"
        else:
            r["rms_vs_simulate"] = rms(cache[r["deployed"]] - cache[twin["deployed"]])


def run_model(name: str, args) -> list[dict]:
    model = models_dir() / f"{MODELS[name]}.onnx"
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration(MODELS[name], work)
    results = [{"model": name, "row": "float", "lowering": "", "deployed": str(model), "integer_gemms": 0,
                "float_gemms": None, "bytes": model.stat().st_size}]
    for label, lowering, row in rows_for(args.setting, args.tdq):
        print(f"[bench] {name} {label} {lowering or ''} ...", flush=True)
        compiled = compile_row(row, model, calib, work)
        counts = compiled["report"]["integer_kernels"]
        kinds: dict[str, int] = {}
        for record in compiled["report"]["quantized"]:
            if record["role"] == "activation" and record["pass"] == "ort":
                kinds[record["lowering"]] = kinds.get(record["lowering"], 0) + 1
        results.append({"model": name, "row": label, "lowering": lowering or "static", "deployed": compiled["path"],
                        "integer_gemms": counts["integer_gemms"], "float_gemms": counts["float_gemms"],
                        "bytes": Path(compiled["path"]).stat().st_size, "compile_s": compiled["wall_s"],
                        "activation_lowerings": kinds})
    static = next(r for r in results if r["row"] == "minmax")
    results[0]["float_gemms"] = static["float_gemms"] + static["integer_gemms"]
    compare(results, calib, model)
    if not args.no_latency:
        measure_latency(results, model, calib, args.runs)
    return results


def write_tables(results: list[dict], meta: dict, out: Path) -> None:
    lines = [f"# Per-timestep tables: integer vs simulated lowering ({meta['date']})", "",
             f"`{meta['command']}`. {meta['setting'].upper()}; latency: median of {meta['runs']} calls on the first "
             "calibration batch, 1 thread, rows interleaved, float first. RMS of the output on that batch: error "
             "vs float; difference to the same tables lowered `--timestep-groups simulate` (on the simulate rows: "
             "the same model with ORT's graph optimizations off, the float-rounding floor).", ""]
    for name in dict.fromkeys(r["model"] for r in results):
        lines += [f"## {name}", "", "| row | lowering | int / float GEMMs | MB | ms | × float | RMS vs float | "
                  "RMS vs simulate |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in results if r["model"] == name):
            latency = f"{r['latency_ms']:.1f} | {r['latency_vs_float']:.2f}" if "latency_ms" in r else "– | –"
            diff = f"{r['rms_vs_simulate']:.2e}" if "rms_vs_simulate" in r else "–"
            diff += " (optimizations off)" if "control" in r else ""
            lines.append(f"| {r['row']} | {r['lowering']} | {r['integer_gemms']} / {r['float_gemms']} | "
                         f"{r['bytes'] / 1e6:.2f} | {latency} | {r['rms_vs_float']:.2e} | {diff} |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "timestep_lowering.md").write_text("\n".join(lines))
    (out / "timestep_lowering.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [r for name in args.models for r in run_model(name, args)]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "setting": args.setting,
            "runs": args.runs, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    write_tables(results, meta, args.out if not args.no_latency else args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
