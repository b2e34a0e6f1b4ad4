"""Train the bundled default model, a tiny ViT on scikit-learn's digits, and export it with its data.

Run ``python -m qcompiler.models.train_digits_vit --seed 0``. It writes, beside this file:

- ``digits_vit.onnx``: input ``pixels`` (batch, 1, 8, 8) float32 in [0, 1], output ``logits``
  (batch, 10); legacy exporter (``dynamo=False``), opset 17, dynamic batch axis.
- ``digits_vit.calib/``: 64 training-split images, 8 per ``.npz``, key ``pixels``.
- ``digits_vit.heldout/``: 64 held-out images, 8 per ``.npz``, keys ``pixels`` and ``__label__``.
- ``digits_vit.json``: seed, steps, training time, accuracies, parameter count, SHA-256 of the ONNX.

Model: a 2x2 stride-2 Conv2d cuts the 8x8 image into 16 patch tokens of width 64, a learned
position embedding is added, then 2 pre-norm transformer blocks (4 heads, GELU MLP 64 -> 128
-> 64), a final LayerNorm, a mean over tokens and a Linear head. Attention is written out
as MatMul -> Mul(1/sqrt(d)) -> Softmax -> MatMul so the ONNX graph carries the attention
pattern that the quantization passes look for, rather than a fused operator.

Data: the 1,797 digits (pixel values 0..16, scaled by 1/16) are split 80/20, stratified by
label, with ``train_test_split(random_state=0)``; the split does not depend on ``--seed``.
Training runs on one thread with deterministic algorithms so a rerun with the same seed
gives the same weights (multi-threaded CPU GEMMs may sum in a different order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
DIM, HEADS, MLP_HIDDEN, DEPTH = 64, 4, 128, 2
PATCH, TOKENS = 2, 16                      # 8x8 image, 2x2 patches -> 4x4 = 16 tokens
BUNDLED_SAMPLES, SAMPLES_PER_FILE = 64, 8
#: ORT and torch run the same float32 graph; they differ only in summation order (~1e-6 on
#: logits of magnitude ~10), so 1e-4 flags a wrong op without flagging kernel choice.
EXPORT_TOLERANCE = 1e-4


class SelfAttention(nn.Module):
    """Multi-head self-attention spelled out op by op: softmax(Q K^T / sqrt(d)) V."""

    def __init__(self):
        super().__init__()
        self.head_dim = DIM // HEADS
        self.query, self.key, self.value, self.out = (nn.Linear(DIM, DIM) for _ in range(4))

    def _heads(self, x):
        # Constant reshape targets (-1 for batch) export as a Reshape with a constant shape.
        return x.reshape(-1, TOKENS, HEADS, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(context.transpose(1, 2).reshape(-1, TOKENS, DIM))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attention = SelfAttention()
        self.mlp = nn.Sequential(nn.Linear(DIM, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, DIM))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """Patch embedding + position embedding + blocks + LayerNorm + mean pool + Linear head."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, DIM, kernel_size=PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        self.blocks = nn.Sequential(*(Block() for _ in range(DEPTH)))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, pixels):
        # reshape(-1, ...) rather than flatten(2): it exports as one Reshape with a constant shape.
        tokens = self.patch_embed(pixels).reshape(-1, DIM, TOKENS).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def load_split() -> dict[str, np.ndarray]:
    """Digits as float32 (n, 1, 8, 8) in [0, 1] and int64 labels, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[:, None]   # digits pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, digits.target.astype(np.int64), test_size=0.2, stratify=digits.target, random_state=0)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, steps: int, batch_size: int = 64,
          lr: float = 3e-3) -> float:
    """AdamW with linear warm-up then cosine decay; returns the final mini-batch loss."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, (s - warmup) / (steps - warmup)))))))
    model.train()
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def export_onnx(model: nn.Module, onnx_path: Path) -> None:
    """Legacy export at opset 17 with a dynamic batch axis (docs/algorithms.md §9)."""
    # The legacy exporter is chosen on purpose; its deprecation warnings are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["pixels"],
            output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, do_constant_folding=True, dynamo=False)


def ort_logits(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0]


def heldout_accuracy(onnx_path: Path, heldout_dir: Path) -> float:
    """Top-1 accuracy of the ONNX model on the ``__label__``-ed npz files, in file order.

    This is the figure ``digits_vit.json`` records and the bundled-model test recomputes.
    """
    correct = total = 0
    for path in sorted(heldout_dir.glob("*.npz")):
        data = np.load(path)
        correct += int((ort_logits(onnx_path, data["pixels"]).argmax(axis=1) == data["__label__"]).sum())
        total += len(data["__label__"])
    return correct / total


def write_npz_folder(folder: Path, pixels: np.ndarray, labels: np.ndarray | None = None) -> None:
    """``pixels`` (and ``__label__``) as ``0000.npz``, ``0001.npz``, ... of SAMPLES_PER_FILE each."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.npz"):
        stale.unlink()
    for index, start in enumerate(range(0, len(pixels), SAMPLES_PER_FILE)):
        arrays = {"pixels": pixels[start:start + SAMPLES_PER_FILE]}
        if labels is not None:
            arrays["__label__"] = labels[start:start + SAMPLES_PER_FILE]
        np.savez(folder / f"{index:04d}.npz", **arrays)


def build(seed: int, steps: int, out_dir: Path = HERE) -> dict:
    """Train, export, verify, write the data folders and the JSON record; return the record."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    split = load_split()
    model = DigitsViT()
    print(f"[digits_vit] training {steps} steps, seed {seed}", flush=True)
    start = time.perf_counter()
    final_loss = train(model, split["x_train"], split["y_train"], seed, steps)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(split["x_test"])).numpy()
    split_accuracy = float((torch_logits.argmax(axis=1) == split["y_test"]).mean())
    print(f"[digits_vit] {train_seconds:.1f} s, final loss {final_loss:.4f}, "
          f"held-out split accuracy {split_accuracy:.4f} ({len(split['y_test'])} images)", flush=True)

    onnx_path = out_dir / "digits_vit.onnx"
    export_onnx(model, onnx_path)
    diff = float(np.abs(ort_logits(onnx_path, split["x_test"]) - torch_logits).max())
    print(f"[digits_vit] exported {onnx_path.name}: ORT vs torch max|diff| = {diff:.3g}", flush=True)
    if not diff < EXPORT_TOLERANCE:  # not an assert statement: it must also run under python -O
        raise AssertionError(f"ONNX export differs from torch by {diff:.3g}")

    n = BUNDLED_SAMPLES
    write_npz_folder(out_dir / "digits_vit.calib", split["x_train"][:n])
    write_npz_folder(out_dir / "digits_vit.heldout", split["x_test"][:n], split["y_test"][:n])
    record = {
        "seed": seed, "steps": steps, "batch_size": 64, "optimizer": "AdamW lr 3e-3 wd 0.05, warm-up + cosine",
        "train_seconds": round(train_seconds, 2), "threads": 1, "final_loss": final_loss,
        "split": "sklearn load_digits, train_test_split(test_size=0.2, stratify=labels, random_state=0)",
        "train_images": len(split["y_train"]), "heldout_split_images": len(split["y_test"]),
        "heldout_split_accuracy": split_accuracy,
        "heldout_accuracy": heldout_accuracy(onnx_path, out_dir / "digits_vit.heldout"),
        "heldout_accuracy_images": n,
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "onnx_max_abs_diff": diff, "opset": 17, "torch": torch.__version__,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    (out_dir / "digits_vit.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[digits_vit] bundled held-out accuracy (ORT, {n} images) {record['heldout_accuracy']:.4f}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.models.train_digits_vit",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: the package folder)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.seed, args.steps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
