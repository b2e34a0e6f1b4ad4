"""Export the trained class-conditional DiT to ONNX, verify it against torch, check its patterns, record it.

Writes, into the chosen folder (the package folder by default):

- ``dit_mnist.onnx``: inputs ``sample`` (B, 1, 32, 32) float32, ``timestep`` (B,) float32 (as
  the UNet's, see ``export_unet``: the DiT's sinusoidal embedding casts it to float anyway),
  ``class_labels`` (B,) int64 (digits 0..9; 10 is the null class, the unconditional input of
  classifier-free guidance); output ``noise_pred`` (B, 1, 32, 32), the predicted epsilon.
- ``dit_mnist.json``: training record (seed, steps, time, loss), DiT, scheduler and training
  configs, parameter count, the prompt list and class names (``mnist_data.prompt_metadata``),
  ORT-vs-torch difference, SHA-256, and what ``qcompiler.patterns``
  finds in the graph (linears, attention) so a change of exporter that hides them shows up.

Exported from the EMA weights with the legacy exporter (``dynamo=False``) at opset 18 with a
dynamic batch axis, as the UNet (``export_unet._export``). diffusers' attention calls
``F.scaled_dot_product_attention``, which that exporter decomposes into MatMul -> Mul (scale)
-> Softmax -> MatMul, the form ``patterns.match_attention`` matches; the linears are MatMul +
Add with constant weights; ``check_patterns`` asserts both.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from qcompiler.models.export_unet import EXPORT_TOLERANCE, OPSET, _export, _max_diff, final_loss

INPUT_NAMES = ["sample", "timestep", "class_labels"]


class PixArtDenoiser(nn.Module):
    """diffusers' ``PixArtTransformer2DModel`` as an ONNX-exportable denoiser: (sample, timestep,
    encoder_hidden_states) → noise prediction, with the 512-px resolution/aspect conditioning off."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.transformer(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                return_dict=False)[0]


def check_patterns(path: Path, layers: int) -> dict:
    """Counts of ops and of matched units; AssertionError if a block's attention or linears are not matched.

    Each DiT block has one self-attention (MatMul -> Softmax -> MatMul) and six linears (q, k, v,
    out, two MLP) besides the per-block AdaLN modulation linear on the conditioning vector.
    """
    from qcompiler.graph import load_model, to_graph
    from qcompiler.patterns import find_attention, find_linears

    graph = to_graph(load_model(path))
    ops = [node.op for node in graph.nodes]
    attention, linears = find_attention(graph), find_linears(graph)
    record = {"matmul": ops.count("MatMul"), "gemm": ops.count("Gemm"), "softmax": ops.count("Softmax"),
              "attention_matched": len(attention), "self_attention": sum(a.kind == "self" for a in attention),
              "linears_matched": len(linears)}
    if record["softmax"] != layers or record["attention_matched"] != layers or record["self_attention"] != layers:
        raise AssertionError(f"{path}: expected {layers} matched self-attentions, got {record}")
    if record["linears_matched"] < 6 * layers:
        raise AssertionError(f"{path}: expected at least {6 * layers} matched linears, got {record}")
    return record


def export_model(model: nn.Module, out_dir: Path, name: str = "dit_mnist", seed: int = 0,
                 layers: int | None = None) -> dict:
    """Export ``model`` (``train_dit.ClassToImage``) to ``<name>.onnx``; return diffs, SHA-256, pattern counts."""
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(4, 1, 32, 32, generator=generator)
    timestep = torch.tensor([999.0, 500.0, 1.0, 261.0])
    labels = torch.tensor([3, 7, 10, 0], dtype=torch.int64)    # 10: the null class
    with torch.no_grad():
        noise_pred = model(sample, timestep, labels)
    path = out_dir / f"{name}.onnx"
    _export(model, (sample, timestep, labels), path, INPUT_NAMES, "noise_pred")
    diff = _max_diff(path, {"sample": sample.numpy(), "timestep": timestep.numpy(), "class_labels": labels.numpy()},
                     noise_pred)
    if not diff < EXPORT_TOLERANCE:  # not an assert: it must also run under python -O
        raise AssertionError(f"dit_max_abs_diff = {diff:.3g} exceeds {EXPORT_TOLERANCE}")
    layers = layers if layers is not None else model.dit.config.num_layers
    return {"dit_max_abs_diff": diff, "opset": OPSET, "exporter": "torch.onnx.export(dynamo=False)",
            "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "onnx_bytes": path.stat().st_size,
            "patterns": check_patterns(path, layers)}


def export_trained(trainer, out_dir: Path, name: str = "dit_mnist") -> dict:
    """Export ``trainer``'s EMA weights and write ``<name>.json`` (and ``<name>.loss.png``)."""
    from qcompiler.models.mnist_data import prompt_metadata
    from qcompiler.models.train_dit import DIT_CONFIG, NULL_CLASS
    from qcompiler.models.train_unet import SCHEDULER_CONFIG

    out_dir.mkdir(parents=True, exist_ok=True)
    ema = trainer.ema
    record = export_model(ema, out_dir, name)
    loss_png = trainer.ckpt_dir / "loss.png"
    if loss_png.exists():
        shutil.copyfile(loss_png, out_dir / f"{name}.loss.png")
    json_path = out_dir / f"{name}.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    record = {
        "seed": trainer.config.seed, "steps": trainer.step, "train_seconds": round(trainer.train_seconds, 1),
        "seconds_per_step": round(trainer.train_seconds / max(1, trainer.step), 3),
        "threads": 1, "final_loss_last_100_steps": final_loss(trainer.ckpt_dir / "loss.csv"),
        "weights": "EMA", "train_config": asdict(trainer.config),
        "dit_config": dict(DIT_CONFIG), "scheduler_config": SCHEDULER_CONFIG,
        "dit_parameters": sum(p.numel() for p in ema.parameters()),
        "conditioning": "class_labels", "num_classes": 10, "null_class": NULL_CLASS,
        "timestep_dtype": "float32", "class_labels_dtype": "int64", "torch": torch.__version__, **record,
        **prompt_metadata(),
    }
    if "quality" in previous and previous.get("onnx_sha256") == record["onnx_sha256"]:
        record["quality"] = previous["quality"]   # same weights: sample_unet's figures still hold
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[dit] exported {name}.onnx ({record['onnx_bytes']:,} bytes) at step {trainer.step}; "
          f"ORT vs torch max|diff| {record['dit_max_abs_diff']:.2g}; patterns {record['patterns']}", flush=True)
    return record


if __name__ == "__main__":  # a quick check of a random tiny DiT: python -m qcompiler.models.export_dit
    import tempfile

    from qcompiler.models.train_dit import ClassToImage

    torch.manual_seed(0)
    tiny = dict(sample_size=32, in_channels=1, out_channels=1, patch_size=4, num_layers=1, num_attention_heads=2,
                attention_head_dim=8, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
    print(export_model(ClassToImage(tiny), Path(tempfile.mkdtemp()), "tiny", layers=1))
