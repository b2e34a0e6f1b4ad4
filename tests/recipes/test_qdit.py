"""Recipe ``qdit`` end to end on the zoo DiT: plans from the pass, every Linear on one ORT integer GEMM."""

import numpy as np
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.recipes import get_recipe
from tests import dit_graphs

needs_dit = pytest.mark.skipif(not dit_graphs.DIT.exists(), reason="dit_mnist.onnx not exported")


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


@needs_dit
def test_qdit_on_the_zoo_dit_integer_and_simulated(tmp_path):
    batches = dit_graphs.dit_batches(count=2)
    recipe = get_recipe("qdit").with_settings({"qdit_groups": {"uniform": 128}})
    outputs = {}
    for mode in ("integer", "simulate"):
        out = tmp_path / f"{mode}.onnx"
        result = qcompiler.quantize(str(dit_graphs.DIT), recipe, batches, out,
                                    CompileOptions(wbits=8, progress=False, dynamic_groups=mode))
        report = result.report
        passes = {p["name"]: p for p in report["passes"]}
        assert not passes["qdit_groups"]["modified"]  # plans only; the target lowers them
        assert "qdit groups: 38 ×" in " ".join(passes["lower"]["notes"])
        integer = report["integer_kernels"]["integer_gemms"]
        assert integer == (39 if mode == "integer" else 1)  # 38 Linears + the patch Conv; simulate: the Conv
        # uniform 128 (paper scale) is 12 of the DiT's 96 channels: 8 partial sums per output of a 96-wide Linear
        cost = [w for w in result.warnings if "partial sums per output" in w]
        assert len(cost) == (1 if mode == "integer" else 0)
        assert mode == "simulate" or cost[0].startswith("38 Linears") and "write 8–32 partial sums" in cost[0]
        outputs[mode] = _run(out, batches[0].feeds)
    reference = _run(dit_graphs.DIT, batches[0].feeds)
    scale = np.abs(reference).max()
    # Same arithmetic to float rounding, apart from codes a rounding flip moves by one step upstream.
    assert np.abs(outputs["integer"] - outputs["simulate"]).max() <= 0.01 * scale
    assert np.abs(outputs["integer"] - reference).max() <= 0.1 * scale  # W8A8 groups: close to float
