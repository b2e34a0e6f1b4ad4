"""The library entry point: ``quantize(model, recipe, calibration, output, options)``.

Stages run in one direction: load → calibrate (lazily, on the statistics passes ask for) →
transform/quantize (the recipe's passes) → save atomically → ask ORT which kernels run → report.
"""

from __future__ import annotations

import json
from functools import partial
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

import qcompiler
from qcompiler.calibration.distributed import ClusterConfig
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import QCompileError
from qcompiler.graph import check_acyclic, load_graph, load_structure, set_metadata, to_graph
from qcompiler.skeleton import SINGLE_FILE_LIMIT, save_skeleton
from qcompiler.pass_manager import ManagerOptions, PassManager
from qcompiler.recipes import Recipe, get_recipe
from qcompiler.targets import LowerStage


@dataclass(frozen=True)
class CompileOptions:
    """How to run a recipe. ``wbits``/``abits`` of None take the recipe's defaults."""

    wbits: int | None = None
    abits: int | None = None
    block_size: int = 32
    calib_limit: int | None = None
    verify: bool = False
    dump_after: tuple[str, ...] = ()
    progress: bool = True
    device: str = "cpu"
    write_report: bool = True
    #: The lowering target (``qcompiler.targets``) and its DGQ channel-group form.
    target: str = "ort"
    channel_groups: str = "affine"
    #: The ORT target's Q-DiT group lowering: "integer" (one integer GEMM (MatMulIntegerToFloat) per Linear) or "simulate".
    dynamic_groups: str = "integer"
    #: DGQ's affine lowering subtracts the calibrated mean of its weight error from the bias.
    bias_correction: bool = True
    #: The ORT target's int4 Conv/Gemm weights: "packed" (ONNX INT4 in the file, unpacked by ORT at load) or "container" (int8).
    int4_storage: str = "packed"
    #: The ORT target's per-timestep / TDQ tables: "auto", "integer" (integer GEMMs, gathered scales on their sums) or "simulate".
    timestep_groups: str = "auto"
    #: Allow the output path to be the input model's own path (the input is replaced atomically).
    force: bool = False
    #: ORT intra-op threads for calibration (None: ORT's default, one per core).
    threads: int | None = None
    #: Run calibration on a dask.distributed cluster (``calibration.distributed``); None: in this process.
    cluster: ClusterConfig | None = None


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: dict
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _load(model, structure: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, gs.Graph | None, str]:
    """(template, graph, source name): a path's external weights are memory-mapped, not read."""
    if isinstance(model, onnx.ModelProto):
        return model, None, "model"
    template, graph = load_graph(model, structure)
    return template, graph, str(model)


def _calibration(source, model: onnx.ModelProto, limit: int | None):
    if source is None:
        return []
    from qcompiler.calibration.readers import load_calibration

    return load_calibration(source, model, limit=limit)


def quantize(model, recipe: str | Recipe = "minmax", calibration=None, output: str | Path | None = None,
             options: CompileOptions = CompileOptions()) -> CompileResult:
    """Quantize ``model`` (path or ModelProto) with ``recipe`` on ``calibration`` data.

    ``calibration``: a folder of .npz files, an ORT ``CalibrationDataReader``, an iterable of
    feed dicts or a callable returning one. With ``output`` the model is written atomically and a
    report ``<output>.report.json`` is written beside it.
    """
    started = time.perf_counter()
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    # Checked in the order a user fixes them, before any heavy work: the model file and its
    # external data (structure only, no weight read), the output location, then calibration.
    structure = None if isinstance(model, onnx.ModelProto) else load_structure(model)
    if output is not None:
        _check_output_path(Path(output), None if structure is None else Path(model), options.force)
    float_model, graph, source = _load(model, structure)
    target = _target(options)
    graph = graph if graph is not None else to_graph(float_model)
    check_acyclic(graph, source)
    target.check_model(float_model, source)
    target.check_recipe(recipe)
    settings = QuantSettings(wbits=options.wbits or recipe.wbits, abits=options.abits or recipe.abits,
                             block_size=options.block_size, device=options.device)
    batches = _calibration(calibration, float_model, options.calib_limit)
    ctx = CompileContext(float_model, settings, batches, source=source, graph=graph)
    ctx.threads = options.threads
    ctx.affine_ops = partial(target.affine_ops, ctx)
    dump_prefix = str(Path(output).with_suffix("")) if output else str(Path(source).with_suffix(""))
    # Passes that measure the deployed model (ptqd) run on the lowered graph.
    passes = recipe.build_passes()
    before = [p for p in passes if not getattr(p, "after_lowering", False)]
    after = [p for p in passes if getattr(p, "after_lowering", False)]
    manager = PassManager(before + [LowerStage(target)] + after,
                          ManagerOptions(options.verify, tuple(options.dump_after), dump_prefix, options.progress))
    try:
        if options.cluster is not None and batches:
            from qcompiler.calibration.distributed import CalibrationCluster

            ctx.cluster = CalibrationCluster(options.cluster, options.threads)  # connects: fails before any pass
        pass_records = manager.run(ctx)
    finally:
        ctx.close()  # scratch files of spilled float weights (only the lowering reads them), the cluster
    quantized = ctx.skeleton()  # weights by reference: saved by streaming, never copied into a proto
    set_metadata(quantized.proto, {"qcompile.version": qcompiler.__version__, "qcompile.recipe": recipe.name,
                             "qcompile.settings": json.dumps(asdict(settings)),
                             "qcompile.passes": ",".join(r.name for r in pass_records),
                             "qcompile.target": target.name,
                             "qcompile.rescaled_tensors": json.dumps(sorted(ctx.rescaled_tensors)),
                             **ctx.metadata})
    compile_seconds = time.perf_counter() - started

    from qcompiler.report import build_report, check_integer_kernels, write_report

    with tempfile.TemporaryDirectory(prefix="qcompile-") as tmp:
        path = Path(output) if output is not None else Path(tmp) / "quantized.onnx"
        save_skeleton(quantized, path)
        report = build_report(recipe, settings, ctx, pass_records, float_model, path, source,
                              compile_seconds, target.name, target.count_kernels(path))
    # Under 2 GiB the result carries the whole model; above, its structure (weights in the saved file).
    model_out = quantized.materialize() if quantized.weight_bytes <= SINGLE_FILE_LIMIT else quantized.proto
    warnings = check_integer_kernels(recipe, report)
    for warning in warnings:
        print(f"qcompile: warning: {warning}", file=sys.stderr)
    if output is not None and options.write_report:
        write_report(report, Path(f"{output}.report.json"))
    return CompileResult(model_out, report, Path(output) if output else None, warnings)


def _target(options: CompileOptions):
    from qcompiler.targets import get_target
    from qcompiler.targets.ort import OrtTargetConfig

    if options.target == "ort":
        try:
            return get_target("ort", OrtTargetConfig(channel_groups=options.channel_groups,
                                                     dynamic_groups=options.dynamic_groups, device=options.device,
                                                     bias_correction=options.bias_correction,
                                                     int4_storage=options.int4_storage,
                                                     timestep_groups=options.timestep_groups))
        except ValueError as exc:
            raise QCompileError(str(exc)) from None
    if options.channel_groups != "affine":
        raise QCompileError(f"--channel-groups {options.channel_groups} is an ONNX Runtime lowering; target "
                            f"'{options.target}' lowers DGQ groups its own way (drop the option)")
    if not options.bias_correction:
        raise QCompileError(f"--bias-correction off is an ONNX Runtime lowering option; target "
                            f"'{options.target}' always corrects (drop the option)")
    if options.dynamic_groups != "integer":
        raise QCompileError(f"--dynamic-groups {options.dynamic_groups} is an ONNX Runtime lowering; target "
                            f"'{options.target}' has none (drop the option)")
    if options.timestep_groups != "auto":
        raise QCompileError(f"--timestep-groups {options.timestep_groups} is an ONNX Runtime lowering; target "
                            f"'{options.target}' replaces per-timestep ranges by static ones (drop the option)")
    if options.int4_storage != "packed":
        raise QCompileError(f"--int4-storage {options.int4_storage} is an ONNX Runtime lowering option; target "
                            f"'{options.target}' stores int4 weights its own way (drop the option)")
    return get_target(options.target)


def _check_output_path(path: Path, source: Path | None = None, force: bool = False) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if source is not None and not force and path.exists() and path.resolve() == source.resolve():
        raise QCompileError(f"{path}: the output path is the input model; choose another -o path "
                            "(or pass --force to replace the input)")
    if path.is_dir():
        raise QCompileError(f"{path}: output path is a directory; give a file name like model.int8.onnx")
    if not folder.is_dir():
        raise QCompileError(f"{path}: output folder {folder} does not exist; create it first")
    import os

    if not os.access(folder, os.W_OK):
        raise QCompileError(f"{path}: output folder {folder} is not writable; choose another -o path")
    try:  # access() says yes for root on /proc and on read-only mounts: create a file to be sure
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise QCompileError(f"{path}: cannot write in output folder {folder} ({exc.strerror or exc}); "
                            "choose another -o path") from None
