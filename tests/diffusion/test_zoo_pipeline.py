"""The zoo's text-to-image UNet as a pipeline folder (models/build_pipeline.py) runs as the zoo always did.

The folder is optimum's layout, loaded by optimum's ORT pipeline classes; these tests check that
it is a faithful re-packaging: built byte-identically twice, its Hugging Face tokenizer gives the
zoo tokenizer's ids, and the pipeline path (``generate``, ``collect_pipeline``) reproduces the
zoo's own DDIM sampler and collector from the same seeds.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("diffusers")

from qcompiler.models import BUNDLED_DEFAULT as UNET

#: Float32 images from the same noise, scheduler and models differ only by ORT summation order over a
#: different batch and diffusers' (x/2 + 0.5)·2 − 1 round trip: ~1e-7 measured; 1e-5 flags any real change.
SAME_IMAGE_ATOL = 1e-5
STEPS, GUIDANCE = 3, 4.0


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from qcompiler.models.build_pipeline import build

    return build(tmp_path_factory.mktemp("zoo") / "unet_mnist")


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_loads_in_optimum(zoo, tmp_path):
    from qcompiler.diffusion.pipeline import load_pipeline, open_pipeline
    from qcompiler.models.build_pipeline import build

    assert _digests(build(tmp_path / "again")) == _digests(zoo)
    folder = open_pipeline(zoo)
    assert (folder.denoiser_name, folder.class_name) == ("unet", "StableDiffusionPipeline")
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "ORTStableDiffusionPipeline" and pipe.vae_scale_factor == 1


def test_tokenizer_gives_the_zoo_ids(zoo):
    from transformers import AutoTokenizer

    from qcompiler.models.mnist_data import Tokenizer

    ours, theirs = AutoTokenizer.from_pretrained(zoo / "tokenizer"), Tokenizer.from_templates()
    prompts = (zoo / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 80
    for prompt in prompts + ["", "A Picture of the digit 3", "an unknown word"]:
        ids = ours(prompt, padding="max_length", max_length=theirs.max_length, truncation=True)["input_ids"]
        assert ids == theirs.encode(prompt).tolist(), prompt


def test_pipeline_images_equal_the_zoo_sampler(zoo):
    from qcompiler.diffusion.evaluate import sample_model
    from qcompiler.diffusion.pipeline import (
        GenerationSettings,
        generate,
        load_pipeline,
        open_pipeline,
    )
    from qcompiler.diffusion.prompts import prompts_from
    from qcompiler.diffusion.sampler import config_for

    folder = open_pipeline(zoo)
    pipe = load_pipeline(folder)
    settings = GenerationSettings(steps=STEPS, guidance_scale=GUIDANCE, batch_size=2, seed=5).resolved(pipe)
    images = generate(pipe, prompts_from(3, folder.root), settings)
    reference, _ = sample_model(UNET, 3, config_for(UNET, steps=STEPS, guidance_scale=GUIDANCE), seed=5)
    assert images.shape == reference.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(images, reference, rtol=0, atol=SAME_IMAGE_ATOL)


def test_pipeline_calibration_equals_the_zoo_collector(zoo, tmp_path):
    from qcompiler.diffusion.collect import collect
    from qcompiler.diffusion.pipeline import GenerationSettings, open_pipeline
    from qcompiler.diffusion.pipeline_collect import collect_pipeline
    from qcompiler.diffusion.prompts import prompts_from
    from qcompiler.diffusion.sampler import config_for

    folder = open_pipeline(zoo)
    settings = GenerationSettings(steps=2, guidance_scale=GUIDANCE, batch_size=2)
    new = collect_pipeline(folder, tmp_path / "new", prompts_from(2, folder.root), settings)
    old = collect(UNET, tmp_path / "old", 2, config_for(UNET, steps=2, guidance_scale=GUIDANCE, batch_size=2))
    assert new.files == old.files == 2 and new.timesteps == old.timesteps
    for name in sorted(p.name for p in (tmp_path / "old").glob("*.npz")):
        a, b = np.load(tmp_path / "new" / name), np.load(tmp_path / "old" / name)
        for key in ("sample", "timestep", "encoder_hidden_states", "__timestep__"):
            assert a[key].shape == b[key].shape, key
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=SAME_IMAGE_ATOL, err_msg=key)


def test_eval_diffusion_cli_on_the_zoo_pipeline(zoo, tmp_path, capsys):
    import json

    from qcompiler.cli.main import main

    out = tmp_path / "eval.json"
    code = main(["eval-diffusion", str(zoo), str(zoo / "unet" / "model.onnx"), "--prompts", "2", "--steps", "2",
                 "--guidance", "4", "--json", str(out), "-q"])
    assert code == 0
    result = json.loads(out.read_text())
    # The float denoiser against itself: identical images, zero Fréchet distance in the identity VAE's features.
    assert result["psnr_db"] == float("inf") and result["ssim"] == 1.0
    assert result["frechet_vae"] == pytest.approx(0.0, abs=1e-6) and result["image_shape"] == [1, 32, 32]
