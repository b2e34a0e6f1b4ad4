"""Export the trained UNet denoiser and its text encoder to ONNX, verify them against torch, record them.

Writes, into the chosen folder (the package folder by default):

- ``unet_mnist.onnx``: inputs ``sample`` (B, 1, 32, 32) float32, ``timestep`` (B,) **float32**
  (a float so every input is a float tensor that calibration statistics can treat alike; the
  UNet casts it to float for its sinusoidal embedding anyway, so integer values given as floats
  give identical outputs), ``encoder_hidden_states`` (B, 10, 64) float32; output ``noise_pred``
  (B, 1, 32, 32), the predicted epsilon.
- ``unet_mnist.text_encoder.onnx``: input ``input_ids`` (B, 10) int64 (``mnist_data.Tokenizer``),
  output ``last_hidden_state`` (B, 10, 64), the cross-attention context.
- ``unet_mnist.json``: training record (seed, steps, time, loss), the UNet, scheduler and
  training configs, the tokenizer vocabulary, the prompt list (``mnist_data.prompt_metadata``),
  ORT-vs-torch differences and SHA-256 of both files.

Both are exported from the EMA weights with the legacy exporter (``dynamo=False``) at opset 18
and a dynamic batch axis. ``dynamo=True`` at opset 21 would give real GroupNormalization and
DequantizeLinear ``block_size`` (docs/algorithms.md §9), but that exporter needs ``onnxscript``,
which the project does not install; the legacy exporter works for UNet2DConditionModel and
emits GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, which
``qcompiler.patterns`` matches. Its highest opset is 20.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18
#: float32 ORT vs torch on the same graph differ only in summation order: ~1e-6 relative on
#: outputs of magnitude ~1; 1e-3 absolute flags a wrong op, not kernel choice.
EXPORT_TOLERANCE = 1e-3


class Denoiser(nn.Module):
    """``noise_pred = unet(sample, timestep, encoder_hidden_states).sample`` with plain tensor I/O."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str) -> None:
    """Legacy TorchScript exporter at OPSET with a dynamic batch axis on every input and the output."""
    dynamic = {name: {0: "batch"} for name in [*input_names, output_name]}
    # The legacy exporter is chosen on purpose (see the module docstring); its warnings are noise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[output_name],
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)


def _max_diff(path: Path, feeds: dict[str, np.ndarray], expected: torch.Tensor) -> float:
    from qcompiler.runtimes.ort import make_session

    got = make_session(path).run(None, feeds)[0]
    return float(np.abs(got - expected.numpy()).max())


def export_models(text_encoder: nn.Module, unet: nn.Module, vocabulary_size: int, out_dir: Path,
                  name: str = "unet_mnist", seed: int = 0) -> dict:
    """Export both networks into ``out_dir``; return ORT-vs-torch diffs and SHA-256s. Raises on mismatch."""
    from qcompiler.models.mnist_data import MAX_LENGTH

    text_encoder, denoiser = text_encoder.eval(), Denoiser(unet).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocabulary_size, (3, MAX_LENGTH), generator=generator)
    with torch.no_grad():
        context = text_encoder(ids)
        sample = torch.randn(3, 1, 32, 32, generator=generator)
        timestep = torch.tensor([999.0, 500.0, 1.0])
        noise_pred = denoiser(sample, timestep, context)
    unet_path, text_path = out_dir / f"{name}.onnx", out_dir / f"{name}.text_encoder.onnx"
    _export(text_encoder, (ids,), text_path, ["input_ids"], "last_hidden_state")
    _export(denoiser, (sample, timestep, context), unet_path,
            ["sample", "timestep", "encoder_hidden_states"], "noise_pred")
    record = {
        "text_encoder_max_abs_diff": _max_diff(text_path, {"input_ids": ids.numpy()}, context),
        "unet_max_abs_diff": _max_diff(unet_path, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                                   "encoder_hidden_states": context.numpy()}, noise_pred),
    }
    for key, value in record.items():
        if not value < EXPORT_TOLERANCE:  # not an assert: it must also run under python -O
            raise AssertionError(f"{key} = {value:.3g} exceeds {EXPORT_TOLERANCE}")
    record.update(opset=OPSET, exporter="torch.onnx.export(dynamo=False)",
                  onnx_sha256=hashlib.sha256(unet_path.read_bytes()).hexdigest(),
                  text_encoder_sha256=hashlib.sha256(text_path.read_bytes()).hexdigest(),
                  onnx_bytes=unet_path.stat().st_size, text_encoder_bytes=text_path.stat().st_size)
    return record


def final_loss(csv_path: Path, window: int = 10) -> float | None:
    """Mean of the last ``window`` logged 10-step losses (the last 100 steps), None if no log."""
    if not csv_path.exists():
        return None
    rows = np.loadtxt(csv_path, delimiter=",", skiprows=1, ndmin=2)
    return round(float(rows[-window:, 1].mean()), 5) if len(rows) else None


def export_trained(trainer, out_dir: Path, name: str = "unet_mnist") -> dict:
    """Export ``trainer``'s EMA weights and write ``<name>.json`` (and ``<name>.loss.png``)."""
    from dataclasses import asdict

    from qcompiler.models.mnist_data import prompt_metadata
    from qcompiler.models.train_unet import SCHEDULER_CONFIG, UNET_VARIANTS

    out_dir.mkdir(parents=True, exist_ok=True)
    ema = trainer.ema
    record = export_models(ema.text_encoder, ema.unet, len(trainer.tokenizer.vocabulary), out_dir, name)
    loss_png = trainer.ckpt_dir / "loss.png"
    if loss_png.exists():
        shutil.copyfile(loss_png, out_dir / f"{name}.loss.png")
    record = {
        "seed": trainer.config.seed, "steps": trainer.step, "train_seconds": round(trainer.train_seconds, 1),
        "threads": 1, "final_loss_last_100_steps": final_loss(trainer.ckpt_dir / "loss.csv"),
        "weights": "EMA", "train_config": asdict(trainer.config),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in UNET_VARIANTS[getattr(trainer, "name", name)].items()},
        "scheduler_config": SCHEDULER_CONFIG,
        "unet_parameters": sum(p.numel() for p in ema.unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in ema.text_encoder.parameters()),
        "vocabulary": list(trainer.tokenizer.vocabulary), "max_length": trainer.tokenizer.max_length,
        "timestep_dtype": "float32", "torch": torch.__version__, **record, **prompt_metadata(),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[unet] exported {name}.onnx ({record['onnx_bytes']:,} bytes) at step {trainer.step}; "
          f"ORT vs torch max|diff| unet {record['unet_max_abs_diff']:.2g}, "
          f"text encoder {record['text_encoder_max_abs_diff']:.2g}", flush=True)
    return record
