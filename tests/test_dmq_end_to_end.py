"""The dmq recipe end to end on the bundled trained UNet at W4A8: runs, stays finite, ORT uses integer kernels.

Few LES iterations and a tiny timestep-tagged calibration in the ``qcompile collect`` format (4
timesteps × 2 rows: noisy latents at that step's noise level, the text encoder's captions) keep it
short; quality is measured by ``benchmarks/bench_dmq.py``, not here.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import qcompiler
import qcompiler.models
from qcompiler.api import CompileOptions
from qcompiler.diffusion.text import TextEncoder, prompts_for
from qcompiler.graph import load_model, to_graph
from qcompiler.patterns import find_convs, find_linears
from qcompiler.recipes import Step, get_recipe
from qcompiler.runtimes.ort import make_session

torch = pytest.importorskip("torch")
UNET = Path(qcompiler.models.__file__).parent / "unet_mnist.onnx"


def _calibration(folder: Path) -> Path:
    """4 files (timesteps 961…81) of 2 rows each: unconditional and conditional, like ``collect`` writes."""
    folder.mkdir()
    text = TextEncoder.for_denoiser(UNET)
    captions, labels = prompts_for(1, UNET)
    context = np.concatenate([text.empty()[None] if text.empty().ndim == 2 else text.empty(), text(captions)])
    rng = np.random.default_rng(0)
    for step, t in enumerate((961, 641, 321, 81)):
        timestep = np.full(2, t, np.int64)
        np.savez(folder / f"b000_s{step:03d}.npz", sample=rng.standard_normal((2, 1, 32, 32)).astype(np.float32),
                 timestep=timestep.astype(np.float32), encoder_hidden_states=context, __timestep__=timestep,
                 __label__=np.array([-1, labels[0]]), __step__=np.full(2, step))
    return folder


def _quick_dmq():
    recipe = get_recipe("dmq")
    # The paper's timestep weighting (off in the recipe by default) so its path runs end to end too.
    quick = {"learned_scales": {"iterations": 3, "samples": 4, "batch_size": 2, "tensors_per_run": 64,
                                "progress": False, "timestep_weighting": "adaptive",
                                "min_gain": 0.0},  # 3 steps gain little: keep what they learn, so the fold runs
             "pow2_skip_scales": {"samples": 8, "progress": False}}
    steps = tuple(Step(s.pass_name, dataclasses.replace(s.config, **quick[s.pass_name]))
                  if s.pass_name in quick else s for s in recipe.steps)
    return dataclasses.replace(recipe, steps=steps)


@pytest.mark.slow
@pytest.mark.skipif(not UNET.exists(), reason="bundled UNet not present")
def test_dmq_w4a8_on_the_unet_runs_on_integer_kernels(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = qcompiler.quantize(UNET, recipe=_quick_dmq(), calibration=_calibration(tmp_path / "calib"),
                                    output=tmp_path / "unet.dmq.w4a8.onnx",
                                    options=CompileOptions(wbits=4, abits=8, progress=False))
    finally:
        torch.set_num_threads(threads)
    report = result.report
    assert [p["name"] for p in report["passes"]] == ["learned_scales", "pow2_skip_scales", "quantize_weights",
                                                     "insert_activation_qdq", "lower"]
    les, pts = report["passes"][0], report["passes"][1]
    assert les["modified"] and "timestep weighting 'adaptive' over 4 timesteps" in " ".join(les["notes"])
    assert "6 targets" in pts["notes"][0]  # the six decoder shortcut convs reading concat(h, skip)
    assert any(r["lowering"].startswith("int8 container, int4 values shifted") for r in report["quantized"]) \
        or all(r.get("lowering") == "left to insert_activation_qdq" for r in report["quantized"] if r["role"] == "pts")
    assert result.warnings == []
    float_graph = to_graph(load_model(UNET))
    gemms = len(find_linears(float_graph)) + len(find_convs(float_graph))
    assert report["quantized_gemms"] == gemms  # every Linear/Conv with a constant weight
    assert report["integer_kernels"]["integer_gemms"] >= gemms  # ... runs as an ORT integer kernel
    batch = np.load(min((tmp_path / "calib").glob("*.npz")))
    feeds = {k: batch[k] for k in batch.files if not k.startswith("__")}
    out = make_session(result.model).run(None, feeds)[0]
    reference = make_session(str(UNET)).run(None, feeds)[0]
    assert np.all(np.isfinite(out))
    # the W4A8 noise prediction is closer to the float one than predicting zeros would be
    assert np.linalg.norm(out - reference) < np.linalg.norm(reference)
