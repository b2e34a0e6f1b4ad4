"""A tiny randomly initialised text-to-image UNet and text encoder, exported once per session (seconds).

Built from the same code paths as the shipped model (``models/export_unet.export_models``),
but with a config small enough that export plus a 2-step sample take a few seconds. Random
weights: these fixtures test the plumbing (shapes, names, determinism), never image quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

TINY_UNET = dict(
    sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
)


def _zoo_prompts() -> dict:
    """The zoo's prompt list, labels and class names, and its bundled classifier (an absolute path)."""
    import qcompiler.models
    from qcompiler.models.mnist_data import prompt_metadata

    classifier = Path(qcompiler.models.__file__).parent / "mnist_classifier.onnx"
    return {**prompt_metadata(), "classifier": str(classifier)}


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
        "max_length": MAX_LENGTH, **_zoo_prompts()}))
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
    (folder / "tiny_dit.json").write_text(json.dumps({"scheduler_config": DEFAULT_SCHEDULER_CONFIG, "null_class": 10,
                                                         **_zoo_prompts()}))
    return folder / "tiny_dit.onnx"


#: A Stable-Diffusion-architecture pipeline small enough to export in seconds (random weights).
SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
              up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
              norm_num_groups=8, sample_size=16, layers_per_block=1)
SD_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16)


def tiny_clip_tokenizer(folder):
    """A CLIPTokenizer from a vocabulary made here: every letter (with and without the word-end
    mark), a few whole words, the two special tokens; no merges, so unknown words spell out."""
    from transformers import CLIPTokenizer

    vocab = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    for word in ("a", "photo", "of", "cat", "dog", "tree"):
        vocab.setdefault(word + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=SD_TEXT["max_position_embeddings"])


@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory):
    """An optimum ONNX export (``unet/``, ``text_encoder/``, ``vae_decoder/``, ...) of a tiny random
    StableDiffusionPipeline, exported once per test session with optimum's ``main_export``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from optimum.exporters.onnx import main_export
    from transformers import CLIPTextConfig, CLIPTextModel

    work = tmp_path_factory.mktemp("sd_pipeline")
    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(work)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), **SD_TEXT))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel(**SD_UNET), vae=AutoencoderKL(**SD_VAE),
                                   text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(work / "torch")
    main_export(str(work / "torch"), str(work / "onnx"), task="text-to-image", device="cpu")
    return work / "onnx"


@pytest.fixture(scope="session")
def sd3_pipeline(tmp_path_factory):
    """optimum's export of a tiny random StableDiffusion3Pipeline: a transformer denoiser
    (``transformer/model.onnx``, an MMDiT), two CLIP text encoders and a T5 encoder sharing the
    tiny tokenizer, a flow-matching scheduler."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from optimum.exporters.onnx import main_export
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    work = tmp_path_factory.mktemp("sd3_pipeline")
    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer(work)
    vocab = len(tokenizer.get_vocab())

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab, projection_dim=32, **SD_TEXT))

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    vae = AutoencoderKL(**SD_VAE, shift_factor=0.0609, scaling_factor=1.5035)  # SD3 decodes with both
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip(),
                                    tokenizer=tokenizer, text_encoder_2=clip(), tokenizer_2=tokenizer,
                                    text_encoder_3=t5, tokenizer_3=tokenizer,
                                    scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(work / "torch")
    main_export(str(work / "torch"), str(work / "onnx"), task="text-to-image", device="cpu")
    return work / "onnx"
