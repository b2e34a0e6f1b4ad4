"""Quantize a pipeline's denoiser and write a complete pipeline folder that optimum loads unchanged.

``qcompile PIPELINE_DIR --recipe R`` quantizes ``unet/model.onnx`` (or
``transformer/model.onnx``) like any model and writes OUT/: a copy of every other file of the
pipeline (text encoder, tokenizer, scheduler, VAE, ``model_index.json``, the denoiser's
``config.json``) and the quantized denoiser at the same path, its weights in
``model.onnx.data`` beside it when they pass the single-file limit. The float denoiser's own
weights (``model.onnx`` and the external data files it names) are not copied. The compile
report is ``OUT/qcompile.report.json``. Everything is written to a staging folder beside OUT
and renamed into place at the end, so a failed compile leaves no partial pipeline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qcompiler.diffusion.pipeline import MODEL_FILE, PipelineFolder
from qcompiler.errors import QCompileError

REPORT_NAME = "qcompile.report.json"


def default_calibration(folder: PipelineFolder) -> Path | None:
    """``<pipeline>.calib/`` beside the pipeline folder (``qcompile collect ... -o`` it), else None."""
    calib = folder.root.with_name(folder.root.name + ".calib")
    return calib if calib.is_dir() else None


def _denoiser_files(folder: PipelineFolder) -> set[str]:
    """The float denoiser's model file and the external data files it names (not copied)."""
    import onnx

    from qcompiler.graph import load_model

    names = {MODEL_FILE}
    model = load_model(folder.denoiser_path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {entry.value for entry in tensor.external_data if entry.key == "location"}
    return names


def check_output(output: Path, force: bool) -> None:
    """Before any work: OUT must not exist (unless ``force``) and its parent must."""
    if output.exists() and not force:
        raise QCompileError(f"{output}: already exists; choose another -o or pass --force to replace it")
    if not output.parent.is_dir():
        raise QCompileError(f"{output}: output folder {output.parent} does not exist")


def compile_pipeline(folder: PipelineFolder, recipe, calibration, output: str | os.PathLike, options):
    """``api.quantize`` of the denoiser into a new pipeline folder ``output``; returns the CompileResult."""
    from dataclasses import replace

    from qcompiler.api import quantize

    output = Path(output)
    check_output(output, options.force)
    skipped = _denoiser_files(folder)
    denoiser_folder = folder.denoiser_path.parent.resolve()

    def ignore(directory: str, names: list[str]) -> set[str]:
        return skipped & set(names) if Path(directory).resolve() == denoiser_folder else set()

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tree = staging / output.name
        shutil.copytree(folder.root, tree, ignore=ignore)
        model_path = tree / folder.denoiser_name / MODEL_FILE
        result = quantize(folder.denoiser_path, recipe, calibration, model_path, replace(options, force=False))
        os.replace(f"{model_path}.report.json", tree / REPORT_NAME)
        if output.exists():  # --force: replace the old folder only once the new one is complete
            shutil.rmtree(output)
        os.replace(tree, output)
    except OSError as exc:
        raise QCompileError(f"{output}: could not write the pipeline ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
