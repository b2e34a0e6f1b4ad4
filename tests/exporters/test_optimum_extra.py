"""The [export] extra's optimum stack imports: its ONNX exporter and its ONNX Runtime diffusion pipelines.

No importorskip: CI installs the extra (install.sh), so a resolver or version break in
optimum / optimum-onnx fails here rather than silently skipping the pipeline tests.
"""

import re
from pathlib import Path


def test_optimum_exporter_and_ort_pipelines_import():
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTDiffusionPipeline, ORTStableDiffusionPipeline

    assert callable(main_export)
    assert issubclass(ORTStableDiffusionPipeline, ORTDiffusionPipeline)


def test_export_extra_pins_optimum_exactly():
    # optimum-onnx pins optimum~=2.1.0; a looser optimum spec in the extra made pip's resolver fail
    # with InconsistentCandidate, so the extra names the exact release both agree on.
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    export = re.search(r"^export = \[(.*?)^\]", text, re.S | re.M).group(1)
    specs = re.findall(r'"(optimum[^"]*)"', export)
    assert "optimum==2.1.0" in specs and any(spec.startswith("optimum-onnx==") for spec in specs), specs
