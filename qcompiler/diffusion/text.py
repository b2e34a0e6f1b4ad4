"""Prompts and their cross-attention contexts: the digit captions, the tokenizer and the ONNX text encoder.

``prompts_for(n)`` is the fixed evaluation/calibration prompt list: prompt i asks for digit
``i mod 10`` under template ``(i // 10) mod T`` (``qcompiler.models.mnist_data.TEMPLATES``),
so any n ≥ 10 covers every digit equally often up to the remainder, and two runs with the
same n use the same prompts.

``TextEncoder`` runs ``<denoiser stem>.text_encoder.onnx`` (input ``input_ids`` (B, L) int64,
output (B, L, D)); the tokenizer's vocabulary is read from ``<denoiser>.json`` when present,
else rebuilt from the caption templates (which is how training builds it). Contexts come
from the float model's text encoder only: quantization here targets the denoiser.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.models.mnist_data import TEMPLATES, Tokenizer, caption


def prompts_for(n: int) -> tuple[list[str], np.ndarray]:
    """``n`` captions and their int64 digit labels (see the module docstring)."""
    labels = np.arange(n, dtype=np.int64) % 10
    return [caption(int(label), (i // 10) % len(TEMPLATES)) for i, label in enumerate(labels)], labels


def text_encoder_path(denoiser_path: str | os.PathLike) -> Path:
    """``unet_mnist.onnx`` -> ``unet_mnist.text_encoder.onnx`` (same folder)."""
    path = Path(denoiser_path)
    return path.with_name(f"{path.stem}.text_encoder.onnx")


class TextEncoder:
    """Captions -> (B, L, D) float32 contexts through the tokenizer and the ONNX text encoder."""

    def __init__(self, path: str | os.PathLike, vocabulary: list[str] | None = None, max_length: int | None = None):
        from qcompiler.runtimes.ort import make_session

        self.path = Path(path)
        if not self.path.exists():
            raise QCompileError(f"{self.path}: text encoder not found (expected beside the float denoiser)")
        self.session = make_session(self.path)
        default = Tokenizer.from_templates()
        self.tokenizer = Tokenizer(tuple(vocabulary) if vocabulary else default.vocabulary,
                                   max_length or default.max_length)

    @classmethod
    def for_denoiser(cls, denoiser_path: str | os.PathLike) -> "TextEncoder":
        """The text encoder that ships beside a float denoiser, with the vocabulary from its JSON."""
        from qcompiler.diffusion.sampler import model_metadata

        metadata = model_metadata(denoiser_path)
        return cls(text_encoder_path(denoiser_path), metadata.get("vocabulary"), metadata.get("max_length"))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode_batch(prompts)
        return self.session.run(None, {"input_ids": ids})[0].astype(np.float32)

    def empty(self) -> np.ndarray:
        """The unconditional context (L, D): the encoding of the empty caption."""
        return self([""])[0]
