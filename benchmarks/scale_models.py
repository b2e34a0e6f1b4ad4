"""Real-size denoisers with random weights: SD-1.5's UNet and PixArt-α's transformer, exported to ONNX.

Nothing is downloaded: each model is built from its published configuration
(``UNet2DConditionModel`` with Stable Diffusion 1.5's config, 859.5 M parameters;
``PixArtTransformer2DModel`` with PixArt-XL-2-512x512's config, 610.9 M parameters) with
seeded random weights, exported by the legacy TorchScript exporter at opset 18 with external
data (``<name>.onnx`` + ``<name>.onnx.data``), and given calibration files (``calib/NNN.npz``,
random latents, timesteps spread over [1, 999], random text embeddings). Random weights prove
memory, time and graph structure, not quality.

    python benchmarks/scale_models.py --model sd15-unet --out /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcompiler.models.export_dit import PixArtDenoiser

OPSET = 18

#: Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the fields that differ
#: from diffusers' defaults plus the ones that define the size.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
#: PixArt-alpha/PixArt-XL-2-512x512's transformer/config.json.
PIXART_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2,
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                  use_additional_conditions=False, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)


class UNetDenoiser(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


#: name -> (builder, latent side at the config's sample size, text tokens, text width)
MODELS = {
    "sd15-unet": (lambda: UNetDenoiser(_diffusers().UNet2DConditionModel(**SD15_UNET)), 77, 768),
    "pixart-512": (lambda: PixArtDenoiser(_diffusers().PixArtTransformer2DModel(**PIXART_512)), 120, 4096),
}


def _diffusers():
    import diffusers

    return diffusers


def _inputs(tokens: int, width: int, latent: int, batch: int, timestep: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, latent, latent), dtype=np.float32),
            "timestep": np.full((batch,), timestep, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, tokens, width), dtype=np.float32)}


def build(name: str, out: Path, latent: int, calib_files: int, seed: int = 0) -> dict:
    """Export ``name`` into ``out/<name>/`` with ``calib_files`` calibration batches; return a record."""
    builder, tokens, width = MODELS[name]
    folder = out / name
    (folder / "calib").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    started = time.perf_counter()
    module = builder().eval()
    params = sum(p.numel() for p in module.parameters())
    print(f"{name}: {params / 1e6:.1f} M parameters, built in {time.perf_counter() - started:.0f} s", flush=True)
    example = _inputs(tokens, width, latent, 1, 500.0, seed)
    path = folder / f"{name}.onnx"
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in example.values()), str(path),
                          input_names=list(example), output_names=["noise_pred"],
                          # PixArt's export with a dynamic batch has an If around a Squeeze that ORT rejects.
                          dynamic_axes=None if name == "pixart-512" else {k: {0: "batch"} for k in [*example, "noise_pred"]},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False, external_data=True)
    export_seconds = time.perf_counter() - started
    del module
    for index, step in enumerate(np.linspace(999, 1, calib_files)):
        np.savez(folder / "calib" / f"{index:03d}.npz", **_inputs(tokens, width, latent, 1, float(round(step)),
                                                                  seed + 1 + index))
    data_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    record = {"model": name, "params": params, "latent": latent, "calib_files": calib_files,
              "export_seconds": round(export_seconds, 1), "bytes_on_disk": data_bytes}
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--latent", type=int, default=64, help="latent side of the calibration inputs (64 = 512 px)")
    parser.add_argument("--calib-files", type=int, default=4)
    args = parser.parse_args(argv)
    for name in args.model:
        build(name, args.out, args.latent, args.calib_files)


if __name__ == "__main__":
    main()
