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
