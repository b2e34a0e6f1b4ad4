"""Recipe ``ptq4dit`` end to end on the zoo DiT: exact balancing, every GEMM on an ORT integer kernel."""

import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.recipes import get_recipe
from tests import dit_graphs

needs_dit = pytest.mark.skipif(not dit_graphs.DIT.exists(), reason="dit_mnist.onnx not exported")


@needs_dit
@pytest.mark.parametrize("wbits", [8, 4])
def test_ptq4dit_on_the_zoo_dit(wbits):
    result = qcompiler.quantize(str(dit_graphs.DIT), "ptq4dit", dit_graphs.dit_batches(count=2),
                                options=CompileOptions(wbits=wbits, progress=False, verify=True))
    report = result.report
    passes = {p["name"]: p for p in report["passes"]}
    assert list(passes) == ["salience_balance", "quantize_weights", "insert_activation_qdq", "lower"]
    assert passes["salience_balance"]["verify"]["max_relative_error"] <= EXACT_RTOL
    assert report["fallbacks"] == []  # 1/B folded into the modulation Gemms and V: no run-time op added
    assert report["integer_kernels"]["integer_gemms"] == report["quantized_gemms"] == 39


def test_csb_alone_is_a_setting():
    recipe = get_recipe("ptq4dit").with_settings({"salience_balance": {"spearman": False}})
    assert recipe.steps[0].config.spearman is False

