"""The same compile twice (with 1 and with 2 ORT calibration threads) gives byte-identical models and
the same report (timings and memory aside)."""

import json

import pytest

from qcompiler.cli.main import main
from qcompiler.models import DIGITS_VIT

CALIB = DIGITS_VIT.with_suffix(".calib")
#: Report fields measured, not decided: wall time and memory.
MEASURED = ("compile_seconds", "peak_rss_bytes", "seconds", "output")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["osplus", "dgq"])
def test_two_runs_are_byte_identical_also_with_1_vs_2_threads(tmp_path, recipe):
    outputs = []
    for run, threads in (("a", "1"), ("b", "2")):
        out = tmp_path / run / "model.onnx"
        out.parent.mkdir()
        assert main([str(DIGITS_VIT), "--recipe", recipe, "--calib", str(CALIB), "-o", str(out), "--quiet",
                     "--threads", threads]) == 0
        outputs.append(out)
    first, second = outputs
    assert first.read_bytes() == second.read_bytes()
    reports = [json.loads(open(f"{path}.report.json").read()) for path in outputs]
    assert _strip(reports[0]) == _strip(reports[1])
