"""Save the zoo's text-to-image UNet as a diffusion pipeline folder in optimum's ONNX layout.

``python -m qcompiler.models.build_pipeline`` writes ``models/unet_mnist/`` (``--out`` elsewhere)
from the bundled files, deterministically (the same bytes on every run), in the layout that
``optimum-cli export onnx --task text-to-image`` writes and ``ORTDiffusionPipeline`` loads as a
``StableDiffusionPipeline``:

- ``unet/model.onnx``: ``unet_mnist.onnx`` with its output renamed ``noise_pred`` -> ``out_sample``
  (optimum's name; nothing else changes) and ``unet/config.json``, the diffusers
  ``UNet2DConditionModel`` config it was trained with (``unet_mnist.json``'s ``unet_config``).
- ``text_encoder/model.onnx``: ``unet_mnist.text_encoder.onnx`` unchanged (input ``input_ids``,
  output ``last_hidden_state``: the names optimum feeds and reads) and a ``config.json`` with its
  sizes. It is the zoo's own small causal transformer (``text_encoder.py``), not CLIP.
- ``tokenizer/``: the zoo's word-level tokenizer (``mnist_data.Tokenizer``, its vocabulary from
  ``unet_mnist.json``: ``<bos> words <eos> <pad>...``, lower-cased, split on whitespace, unknown
  words ``<unk>``) rebuilt as a Hugging Face ``PreTrainedTokenizerFast`` (``tokenizers``'
  WordLevel model), so the pipeline's
  ``tokenizer(prompt, padding="max_length", max_length=10)`` gives the ids the zoo was trained on.
- ``scheduler/scheduler_config.json``: the ``DDIMScheduler`` the zoo samples with
  (``qcompiler.diffusion.sampler.SamplerConfig.scheduler``: the training schedule,
  'leading' spacing, offset 1, no clipping).
- ``vae_decoder/`` and ``vae_encoder/``: the zoo denoises pixels, not latents, so its "VAE" is the
  identity (``scaling_factor`` 1, one block so the pipeline's ``vae_scale_factor`` is 1): the
  decoder passes the latent through; the encoder returns the image as the latent mean and
  log-variance −30 (the floor diffusers clamps to, so a sample is the image itself).
- ``prompts.txt``: the zoo's caption prompts (``unet_mnist.json``'s ``prompts``, one full cycle:
  prompt i asks for digit i mod 10 under template (i // 10) mod 8); ``--prompts N`` takes the first N of a pipeline's
  ``prompts.txt`` (cycled), so N prompts here are the ones the zoo always used.
- ``model_index.json``: ``StableDiffusionPipeline`` with these components, no safety checker.

The bundled calibration folder ``unet_mnist.calib/`` sits beside ``unet_mnist/``, where
``qcompile unet_mnist/ --recipe R`` looks for a pipeline's calibration by default; its files hold
the same denoiser inputs (``sample``, ``timestep``, ``encoder_hidden_states``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from qcompiler.models.text_encoder import TEXT_DEPTH, TEXT_DIM, TEXT_HEADS, TEXT_MLP

HERE = Path(__file__).parent
NAME = "unet_mnist"
#: optimum's denoiser output name (ORTUnet reads ``out_sample``).
UNET_OUTPUT = "out_sample"
#: log-variance of the identity VAE encoder: diffusers clamps log-variances to [-30, 20].
LOGVAR_FLOOR = -30.0


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def renamed_output(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """The graph with output ``old`` renamed ``new`` (producer and graph output; no other use exists)."""
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        if old in node.input:
            raise ValueError(f"{old} is also consumed inside the graph; renaming it is not a pure relabel")
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    return model


def identity_vae(encoder: bool) -> onnx.ModelProto:
    """Decoder: ``sample = latent_sample``; encoder: ``latent_parameters = [sample; −30]`` on channels."""
    dims = ["batch", 1, "height", "width"]
    if not encoder:
        nodes = [helper.make_node("Identity", ["latent_sample"], ["sample"])]
        inputs, outputs = ("latent_sample", dims), ("sample", dims)
    else:
        floor = helper.make_tensor("logvar_floor", TensorProto.FLOAT, [1], [LOGVAR_FLOOR])
        nodes = [helper.make_node("Shape", ["sample"], ["shape"]),
                 helper.make_node("ConstantOfShape", ["shape"], ["logvar"], value=floor),
                 helper.make_node("Concat", ["sample", "logvar"], ["latent_parameters"], axis=1)]
        inputs, outputs = ("sample", dims), ("latent_parameters", ["batch", 2, "height", "width"])
    graph = helper.make_graph(nodes, "identity_vae_" + ("encoder" if encoder else "decoder"),
                              [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, inputs[1])],
                              [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, outputs[1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="qcompile")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def hf_tokenizer(vocabulary: list[str], max_length: int):
    """The zoo's word-level tokenizer as a ``PreTrainedTokenizerFast`` (same ids, see the module docstring)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    index = {word: i for i, word in enumerate(vocabulary)}
    rust = RustTokenizer(models.WordLevel(index, unk_token="<unk>"))
    rust.normalizer = normalizers.Lowercase()
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", index["<bos>"]), ("<eos>", index["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=rust, model_max_length=max_length, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="right")


def build(out: Path, source: Path = HERE, name: str = NAME) -> Path:
    """Write the pipeline folder ``out`` (replaced if it exists) from ``source/<name>.*``."""
    import diffusers
    from diffusers import UNet2DConditionModel

    from qcompiler.diffusion.sampler import SamplerConfig

    record = json.loads((source / f"{name}.json").read_text())
    staging = out.with_name(f".{out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    unet = onnx.load(str(source / f"{name}.onnx"))
    _save_onnx(renamed_output(unet, unet.graph.output[0].name, UNET_OUTPUT), staging / "unet" / "model.onnx")
    # The config diffusers writes for this architecture (every default filled in), as optimum's export has it.
    UNet2DConditionModel.from_config(record["unet_config"]).save_config(staging / "unet")
    _save_onnx(onnx.load(str(source / f"{name}.text_encoder.onnx")), staging / "text_encoder" / "model.onnx")
    vocabulary, max_length = record["vocabulary"], record["max_length"]
    _json(staging / "text_encoder" / "config.json", {
        "architectures": ["qcompiler.models.text_encoder.TextEncoder"], "model_type": "qcompile-zoo-text-encoder",
        "hidden_size": TEXT_DIM, "num_attention_heads": TEXT_HEADS, "num_hidden_layers": TEXT_DEPTH,
        "intermediate_size": TEXT_MLP, "max_position_embeddings": max_length, "vocab_size": len(vocabulary)})
    hf_tokenizer(vocabulary, max_length).save_pretrained(staging / "tokenizer")
    scheduler = SamplerConfig(scheduler_config=record["scheduler_config"]).scheduler()
    scheduler.save_config(staging / "scheduler")
    for part, encoder in (("vae_decoder", False), ("vae_encoder", True)):
        _save_onnx(identity_vae(encoder), staging / part / "model.onnx")
        _json(staging / part / "config.json", {
            "_class_name": "IdentityVAE", "_comment": "pixel-space diffusion: the latent is the image",
            "scaling_factor": 1.0, "shift_factor": None, "block_out_channels": [1], "latent_channels": 1,
            "in_channels": 1, "out_channels": 1, "force_upcast": False})
    (staging / "prompts.txt").write_text("\n".join(record["prompts"]) + "\n")
    _json(staging / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["qcompiler.models.text_encoder", "TextEncoder"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["qcompiler.models.build_pipeline", "IdentityVAE"]})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / NAME, help=f"output folder (default models/{NAME}/)")
    args = parser.parse_args(argv)
    print(f"wrote {build(args.out)}")


if __name__ == "__main__":
    main()
