"""DiT test models: the zoo's class-conditional DiT with seeded inputs, a tiny PixArt export, a hand-built block."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import qcompiler.models
from qcompiler.calibration.readers import CalibrationBatch
from tests.graphs import init, make_model

DIT = Path(qcompiler.models.__file__).parent / "dit_mnist.onnx"

#: PixArt-α's transformer configuration (PixArt-XL-2-512x512) with its widths and depth cut down so the
#: export takes seconds: norm_type, activation, caption projection and the shared AdaLN-single are kept.
PIXART_SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                    cross_attention_dim=32, caption_channels=24, sample_size=8, patch_size=2,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    use_additional_conditions=False, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)


def dit_batches(count: int = 3, batch: int = 4, seed: int = 0) -> list[CalibrationBatch]:
    """Zoo-DiT feeds: N(0, 1) latents, one timestep per batch (tagged as ``qcompile collect`` does), digits 0..10."""
    rng = np.random.default_rng(seed)
    batches = []
    for index, step in enumerate(np.linspace(981, 1, count).round().astype(np.int64)):
        feeds = {"sample": rng.standard_normal((batch, 1, 32, 32)).astype(np.float32),
                 "timestep": np.full(batch, step, np.float32),
                 "class_labels": rng.integers(0, 11, batch).astype(np.int64)}
        batches.append(CalibrationBatch(feeds, {"__timestep__": np.full(batch, step)}, f"dit#{index}"))
    return batches


def pixart_model(folder: Path, seed: int = 0) -> onnx.ModelProto:
    """``PixArtTransformer2DModel(**PIXART_SMALL)`` with seeded random weights, exported as benchmarks/scale_models
    does (legacy exporter, opset 18, static shapes: batch 2, 8×8 latents, 6 text tokens)."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from qcompiler.models.export_dit import PixArtDenoiser

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**PIXART_SMALL).eval()

    example = (torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 6, 24))
    path = folder / "pixart_small.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PixArtDenoiser(transformer), example, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                          output_names=["noise_pred"], opset_version=18, do_constant_folding=True, dynamo=False)
    return onnx.load(path)


def modulated_block(scale_source: str = "linear", channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x (B, 4, C) → LayerNorm → ·S + T → MatMul + b → y, with c (B, E) the conditioning vector.

    ``scale_source``: ``linear``: S, T are slices of Gemm(c) (as diffusers' DiT: 1 + scale, shift);
    ``sigmoid``: S = 1 + Sigmoid(c) and T = the graph input ``shift`` (a modulation that is no Linear).
    """
    rng = np.random.default_rng(seed)
    c = channels
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    block = [helper.make_node("LayerNormalization", ["x", "ln.g"], ["n"], name="ln", axis=-1),
             helper.make_node("Add", ["scale3", "one"], ["s"], name="one_plus"),
             helper.make_node("Mul", ["n", "s"], ["ns"], name="modulate_scale"),
             helper.make_node("Add", ["ns", "shift3"], ["h"], name="modulate_shift"),
             helper.make_node("MatMul", ["h", "fc.W"], ["fc.mm"], name="fc"),
             helper.make_node("Add", ["fc.mm", "fc.b"], ["y"], name="fc.bias")]
    inits = [init("ln.g", np.ones(c, np.float32)), init("one", np.array(1.0, np.float32)),
             init("axis1", np.array([1], np.int64)),
             init("fc.W", (rng.standard_normal((c, 6)) / np.sqrt(c)).astype(np.float32)),
             init("fc.b", rng.standard_normal(6).astype(np.float32))]
    inputs = [value("x", ["B", 4, c]), value("c", ["B", c])]
    if scale_source == "linear":
        nodes = [helper.make_node("Gemm", ["c", "mod.W", "mod.b"], ["mod"], name="modulation", transB=1),
                  helper.make_node("Slice", ["mod", "zero", "c1", "axis1"], ["shift2"], name="chunk_shift"),
                  helper.make_node("Slice", ["mod", "c1", "c2", "axis1"], ["scale2"], name="chunk_scale"),
                  helper.make_node("Unsqueeze", ["shift2", "axis1"], ["shift3"], name="unsqueeze_shift"),
                  helper.make_node("Unsqueeze", ["scale2", "axis1"], ["scale3"], name="unsqueeze_scale")]
        inits += [init("mod.W", (0.3 * rng.standard_normal((2 * c, c))).astype(np.float32)),
                  init("mod.b", (0.1 * rng.standard_normal(2 * c)).astype(np.float32)),
                  init("zero", np.array([0], np.int64)), init("c1", np.array([c], np.int64)),
                  init("c2", np.array([2 * c], np.int64))]
    elif scale_source == "sigmoid":
        nodes = [helper.make_node("Sigmoid", ["c"], ["gate"], name="not_a_linear"),
                  helper.make_node("Unsqueeze", ["gate", "axis1"], ["scale3"], name="unsqueeze_scale"),
                  helper.make_node("Unsqueeze", ["shift", "axis1"], ["shift3"], name="unsqueeze_shift")]
        inputs.append(value("shift", ["B", c]))
    else:
        raise ValueError(scale_source)
    model = make_model(nodes + block, inputs, [value("y", ["B", 4, 6])], inits)
    return onnx.shape_inference.infer_shapes(model)
