"""collect → compile → eval-diffusion on a tiny Stable Diffusion pipeline exported by optimum.

The pipeline (``conftest.sd_pipeline``) has random weights: these tests check that qcompile
drives the user's pipeline faithfully (the recorded feeds are the trajectory the pipeline
walks, the output folder loads in optimum, the same seeds give the same images), not image
quality.
"""

from __future__ import annotations

import filecmp
import json

import numpy as np
import onnx
import pytest

from qcompiler.cli.main import main

pytestmark = pytest.mark.slow
STEPS, PROMPTS = 3, ["a photo of a cat", "a dog", "a tree", "a photo of a dog"]


@pytest.fixture(scope="module")
def workspace(sd_pipeline, tmp_path_factory):
    """The prompt file and one collection (4 prompts, batches of 2, 3 steps) shared by the tests."""
    work = tmp_path_factory.mktemp("pipeline_work")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    assert main(["collect", str(sd_pipeline), "--prompts", str(work / "prompts.txt"), "--steps", str(STEPS),
                 "--batch-size", "2", "-o", str(work / "calib")]) == 0
    return work


@pytest.fixture(scope="module")
def quantized(sd_pipeline, workspace):
    out = workspace / "sd.minmax"
    assert main([str(sd_pipeline), "--recipe", "minmax", "--calib", str(workspace / "calib"), "-o", str(out),
                 "--quiet"]) == 0
    return out


def _denoiser_step(sd_pipeline, data, guidance):
    """x_{t-1} from one recorded file: the UNet on its feeds, guidance, the pipeline's own scheduler."""
    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler

    session = ort.InferenceSession(str(sd_pipeline / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs()}
    eps_uncond, eps_cond = np.split(session.run(None, feeds)[0], 2)
    scheduler = DDIMScheduler.from_pretrained(sd_pipeline / "scheduler")
    scheduler.set_timesteps(STEPS)
    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
    latents = data["sample"][: len(eps)]
    return scheduler.step(torch.from_numpy(eps), int(data["__timestep__"][0]), torch.from_numpy(latents)).prev_sample


def test_collect_records_every_step_of_the_pipelines_trajectory(sd_pipeline, workspace):
    from diffusers import DDIMScheduler

    calib = workspace / "calib"
    files = sorted(calib.glob("*.npz"))
    assert len(files) == 2 * STEPS  # 4 prompts in batches of 2, every step
    info = json.loads((calib / "collection.json").read_text())
    assert info["prompts"] == PROMPTS and info["settings"]["steps"] == STEPS
    inputs = {i.name for i in onnx.load(sd_pipeline / "unet" / "model.onnx").graph.input}
    scheduler = DDIMScheduler.from_pretrained(sd_pipeline / "scheduler")
    scheduler.set_timesteps(STEPS)
    for path in files:
        data = np.load(path)
        assert {k for k in data.files if not k.startswith("__")} == inputs
        batch, step = int(path.stem[1:4]), int(path.stem[-3:])
        # Classifier-free guidance: [unconditional; prompted] rows on the same latents.
        np.testing.assert_array_equal(data["__prompt__"], [-1, -1, 2 * batch, 2 * batch + 1])
        np.testing.assert_array_equal(data["sample"][:2], data["sample"][2:])
        assert (data["__timestep__"] == int(scheduler.timesteps[step])).all() and (data["__step__"] == step).all()
    # The feeds are the pipeline's own trajectory: replaying step s (UNet, guidance 7.5 = the
    # pipeline's default, its scheduler) gives the latents recorded at step s+1.
    guidance = info["settings"]["guidance_scale"]
    for step in range(STEPS - 1):
        current, following = (np.load(calib / f"b001_s{s:03d}.npz") for s in (step, step + 1))
        np.testing.assert_allclose(_denoiser_step(sd_pipeline, current, guidance).numpy(), following["sample"][:2],
                                   rtol=1e-4, atol=1e-5)


def test_max_files_keeps_every_step(sd_pipeline, workspace, tmp_path):
    out = tmp_path / "calib"
    assert main(["collect", str(sd_pipeline), "--prompts", "4", "--steps", str(STEPS), "--batch-size", "2",
                 "--max-files", "4", "-o", str(out)]) == 0
    steps = sorted(int(p.stem[-3:]) for p in out.glob("*.npz"))
    assert len(steps) == 4 and set(steps) == set(range(STEPS))


def test_compiled_pipeline_loads_in_optimum_unchanged(sd_pipeline, quantized):
    from optimum.onnxruntime import ORTDiffusionPipeline

    model = onnx.load(quantized / "unet" / "model.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 0
    assert (quantized / "qcompile.report.json").is_file()
    for part in ("model_index.json", "unet/config.json", "text_encoder/model.onnx", "vae_decoder/model.onnx",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json"):
        assert filecmp.cmp(sd_pipeline / part, quantized / part, shallow=False), part
    pipe = ORTDiffusionPipeline.from_pretrained(quantized)
    assert type(pipe).__name__ == "ORTStableDiffusionPipeline"
    assert pipe.unet.path == quantized / "unet" / "model.onnx"


def test_eval_diffusion_float_against_itself_is_exact(sd_pipeline, tmp_path):
    # Same seeds and settings in both pipelines: the float denoiser swapped in for itself must
    # reproduce every image bit for bit.
    out = tmp_path / "same.json"
    assert main(["eval-diffusion", str(sd_pipeline), str(sd_pipeline / "unet" / "model.onnx"), "--prompts", "3",
                 "--steps", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["psnr_db"] == float("inf") and result["ssim"] == 1.0
    # Identical feature sets: 0 up to the float64 rounding of two eigen-decompositions (features ~1).
    assert abs(result["frechet_vae"]) < 1e-5


def test_eval_diffusion_quantized_pipeline(sd_pipeline, quantized, tmp_path):
    from qcompiler.diffusion.pipeline import GenerationSettings, generate, load_pipeline, open_pipeline
    from qcompiler.diffusion.prompts import prompts_from

    out, grid = tmp_path / "q.json", tmp_path / "grid.png"
    assert main(["eval-diffusion", str(sd_pipeline), str(quantized), "--prompts", "4", "--steps", str(STEPS),
                 "--grid", str(grid), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert grid.stat().st_size > 0 and result["image_shape"] == [3, 16, 16]
    assert np.isfinite(result["psnr_db"]) and result["ssim"] < 1.0 and result["frechet_vae"] > 0
    # A quantized image must be closer to its own float image than float images from other seeds are.
    folder = open_pipeline(sd_pipeline)
    pipe = load_pipeline(folder)
    settings = GenerationSettings(steps=STEPS).resolved(pipe)
    a = generate(pipe, prompts_from(4), settings)
    b = generate(pipe, prompts_from(4), GenerationSettings(steps=STEPS, seed=100).resolved(pipe))
    from qcompiler.diffusion import metrics

    assert result["psnr_db"] > float(np.mean(metrics.psnr_per_image(a, b)))


def test_external_data_denoiser_is_not_copied(sd_pipeline, workspace, tmp_path):
    import shutil

    from optimum.onnxruntime import ORTDiffusionPipeline

    source = tmp_path / "ext"
    shutil.copytree(sd_pipeline, source)
    model = onnx.load(source / "unet" / "model.onnx")
    onnx.save_model(model, str(source / "unet" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    out = tmp_path / "ext.q"
    assert main([str(source), "--recipe", "minmax", "--calib", str(workspace / "calib"), "-o", str(out),
                 "--quiet"]) == 0
    assert not (out / "unet" / "model.onnx_data").exists()
    assert ORTDiffusionPipeline.from_pretrained(out).unet is not None


def test_transformer_pipeline_end_to_end(sd3_pipeline, tmp_path):
    """The same three commands on a pipeline whose denoiser is a transformer (SD3's MMDiT)."""
    from optimum.onnxruntime import ORTDiffusionPipeline

    calib, out, result = tmp_path / "calib", tmp_path / "sd3.minmax", tmp_path / "eval.json"
    assert main(["collect", str(sd3_pipeline), "--prompts", "2", "--steps", "2", "-o", str(calib)]) == 0
    data = np.load(calib / "b000_s000.npz")
    inputs = {i.name for i in onnx.load(sd3_pipeline / "transformer" / "model.onnx").graph.input}
    assert {k for k in data.files if not k.startswith("__")} == inputs and "hidden_states" in inputs
    np.testing.assert_array_equal(data["__prompt__"], [-1, -1, 0, 1])
    assert main([str(sd3_pipeline), "--recipe", "minmax", "--calib", str(calib), "-o", str(out), "--quiet"]) == 0
    assert type(ORTDiffusionPipeline.from_pretrained(out)).__name__ == "ORTStableDiffusion3Pipeline"
    assert main(["eval-diffusion", str(sd3_pipeline), str(out), "--prompts", "2", "--steps", "2",
                 "--json", str(result)]) == 0
    numbers = json.loads(result.read_text())
    assert numbers["denoiser"] == "transformer" and np.isfinite(numbers["psnr_db"]) and numbers["ssim"] < 1.0
