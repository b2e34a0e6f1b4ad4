"""The ``dgq`` recipe on the bundled trained UNet: every lowering recorded, integer kernels, per-timestep ranges.

A small slice of the shipped timestep-tagged calibration (4 rows at each of 5 timesteps) keeps it
short; final-image quality is measured by ``benchmarks/bench_diffusion.py``, not here.
"""

import numpy as np
import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.models import BUNDLED_DEFAULT
from qcompiler.targets.ort_groups import AFFINE
from qcompiler.lowering.timestep_integer import INTEGER
from qcompiler.quant import sqnr_db
from qcompiler.recipes import get_recipe
from qcompiler.runtimes.ort import make_session

PER_TIMESTEP = f"{INTEGER} (per-timestep)"

STEPS = (0, 6, 12, 18, 24)  # t = 961, 721, 481, 241, 1


def _batches():
    files = sorted(BUNDLED_DEFAULT.with_suffix(".calib").glob("*.npz"))
    batches = []
    for index in STEPS:
        with np.load(files[index]) as data:
            batches.append({k: data[k][:4] for k in data.files})
    return batches


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dgq_unet")
    feeds = [{k: v for k, v in b.items() if not k.startswith("__")} for b in _batches()]
    results = {}
    for name, recipe in (("dgq", get_recipe("dgq")),
                         ("per_timestep", get_recipe("dgq").with_settings({"dgq_groups": {"per_timestep": True}}))):
        out = folder / f"unet.{name}.onnx"
        # Per-timestep tables forced onto integer kernels everywhere (the default "auto" keeps the
        # forms that are slower as integer simulated; tests/lowering/test_timestep_integer.py).
        options = CompileOptions(progress=False, timestep_groups="integer")
        results[name] = (out, qcompiler.quantize(BUNDLED_DEFAULT, recipe, feeds, out, options))
    return results, feeds


def test_every_weight_gemm_is_lowered_and_runs_on_integer_kernels(compiled):
    results, _ = compiled
    report = results["dgq"][1].report
    assert report["quantized_gemms"] == 136
    lowered = {r["node"]: r["lowering"] for r in report["quantized"]
               if r["role"] == "activation" and r["pass"] == "ort" and "group_axis" in r}
    # Inputs whose groups beat one per-tensor grid on held-out rows are affine-lowered; the others
    # (dropped by dgq_groups's validation) are quantized per tensor: every GEMM is one integer kernel.
    assert 0 < len(lowered) <= 136 and set(lowered.values()) == {AFFINE}
    notes = next(p for p in report["passes"] if p["name"] == "dgq_groups")["notes"]
    assert any("held-out validation" in note for note in notes)
    assert report["integer_kernels"]["integer_gemms"] == 136  # one kernel per GEMM


def test_outputs_track_float_and_per_timestep_ranges_are_finer(compiled):
    results, feeds = compiled
    float_session = make_session(BUNDLED_DEFAULT)
    sqnr = {}
    for name, (path, _) in results.items():
        session = make_session(path)
        sqnr[name] = np.mean([sqnr_db(float_session.run(None, f)[0], session.run(None, f)[0]) for f in feeds])
    assert sqnr["dgq"] > 20.0
    # On the calibrated rows every per-timestep range lies inside the static one: finer grids.
    assert sqnr["per_timestep"] > sqnr["dgq"] + 1.0, sqnr
    report = results["per_timestep"][1].report
    lowering = {r["lowering"] for r in report["quantized"] if r["role"] == "activation"}
    assert lowering == {PER_TIMESTEP}, lowering
    # One integer GEMM per channel group of every planned input: no float GEMM on a quantized weight.
    groups = sum(r.get("integer_gemms", 0) for r in report["quantized"] if r["role"] == "activation")
    assert report["integer_kernels"]["integer_gemms"] == groups > 136
