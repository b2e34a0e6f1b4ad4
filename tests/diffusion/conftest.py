"""A tiny randomly initialised text-to-image UNet and text encoder, exported once per session (seconds).

Built from the same code paths as the shipped model (``models/export_unet.export_models``),
but with a config small enough that export plus a 2-step sample take a few seconds. Random
weights: these fixtures test the plumbing (shapes, names, determinism), never image quality.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

TINY_UNET = dict(
    sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)


@pytest.fixture(scope="session")
def tiny_denoiser(tmp_path_factory):
    """Path of ``tiny.onnx`` with ``tiny.text_encoder.onnx`` and ``tiny.json`` beside it."""
    from diffusers import UNet2DConditionModel

    from qcompiler.models.export_unet import export_models
    from qcompiler.models.mnist_data import MAX_LENGTH, Tokenizer
    from qcompiler.models.text_encoder import TextEncoder
    from qcompiler.diffusion.sampler import DEFAULT_SCHEDULER_CONFIG

    folder = tmp_path_factory.mktemp("tiny_unet")
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_templates()
    text_encoder = TextEncoder(len(tokenizer.vocabulary), MAX_LENGTH, dim=16, heads=2, depth=1, hidden=32)
    export_models(text_encoder, UNet2DConditionModel(**TINY_UNET), len(tokenizer.vocabulary), folder, "tiny")
    (folder / "tiny.json").write_text(json.dumps({
        "scheduler_config": DEFAULT_SCHEDULER_CONFIG, "vocabulary": list(tokenizer.vocabulary),
        "max_length": MAX_LENGTH}))
    return folder / "tiny.onnx"


TINY_DIT = dict(sample_size=32, in_channels=1, out_channels=1, patch_size=4, num_layers=1, num_attention_heads=2,
                attention_head_dim=8, num_embeds_ada_norm=10, norm_type="ada_norm_zero")


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory):
    """Path of ``tiny_dit.onnx`` (inputs sample, timestep, class_labels) with ``tiny_dit.json`` beside it.

    Exported through ``models/export_dit.export_model`` from a one-block random DiT.
    """
    from qcompiler.diffusion.sampler import DEFAULT_SCHEDULER_CONFIG
    from qcompiler.models.export_dit import export_model
    from qcompiler.models.train_dit import ClassToImage

    folder = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(0)
    model = ClassToImage(TINY_DIT)
    with torch.no_grad():  # AdaLN-zero starts at an identity block and a zero output: give it some signal
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape))
    export_model(model, folder, "tiny_dit", layers=1)
    (folder / "tiny_dit.json").write_text(json.dumps({"scheduler_config": DEFAULT_SCHEDULER_CONFIG, "null_class": 10}))
    return folder / "tiny_dit.onnx"
