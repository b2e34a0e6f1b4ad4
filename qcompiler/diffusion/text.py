"""Prompts and their cross-attention contexts for a bare denoiser ONNX: its prompt list, tokenizer and text encoder.

A float denoiser run without a pipeline folder carries what the sampler needs as data in
``<denoiser>.json`` beside it (the zoo's export scripts write it):

- ``prompts`` (list of str) and ``prompt_labels`` (list of int, one per prompt; −1 = none): the
  fixed evaluation/calibration prompt list; ``prompts_for(n, denoiser)`` takes the first n,
  cycled, so two runs with the same n use the same prompts;
- ``vocabulary`` and ``max_length``: a word-level tokenizer (``WordTokenizer``: ``<bos> words
  <eos> <pad>...``, as Stable Diffusion's CLIP tokenizer pads, so the start-token column exists
  in cross-attention);
- ``class_names`` for a class-conditioned denoiser (``conditioning.ClassLabels``).

``TextEncoder`` runs ``<denoiser stem>.text_encoder.onnx`` (input ``input_ids`` (B, L) int64,
output (B, L, D)). Contexts come from the float model's text encoder only: quantization here
targets the denoiser. A diffusion pipeline folder (``pipeline.py``) brings its own tokenizer and
text encoder instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.errors import QCompileError


@dataclass(frozen=True)
class WordTokenizer:
    """Word-level tokenizer: ``<bos> words <eos> <pad>...`` (lower-cased, split on whitespace, else ``<unk>``)."""

    vocabulary: tuple[str, ...]
    max_length: int

    @property
    def pad_id(self) -> int:
        return self.vocabulary.index("<pad>")

    def encode(self, text: str) -> np.ndarray:
        """int64 ids of length ``max_length``; ValueError if the caption does not fit."""
        index = {w: i for i, w in enumerate(self.vocabulary)}
        words = text.lower().split()
        ids = [index["<bos>"]] + [index.get(w, index["<unk>"]) for w in words] + [index["<eos>"]]
        if len(ids) > self.max_length:
            raise ValueError(f"caption {text!r} has {len(words)} words; at most {self.max_length - 2} fit")
        return np.array(ids + [self.pad_id] * (self.max_length - len(ids)), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts])


def _metadata(denoiser_path: str | os.PathLike, key: str):
    """``<denoiser>.json``'s ``key``; QCompileError naming the file and key when it is missing."""
    from qcompiler.diffusion.sampler import model_metadata

    value = model_metadata(denoiser_path).get(key)
    if value is None:
        raise QCompileError(f"{Path(denoiser_path).with_suffix('.json')}: no '{key}' (a bare denoiser's JSON "
                            "carries its prompts, tokenizer vocabulary and class names; or use a pipeline folder)")
    return value


def prompts_for(n: int, denoiser_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """The first ``n`` prompts of the denoiser's list (cycled) and their int64 labels (see the module docstring)."""
    prompts = list(_metadata(denoiser_path, "prompts"))
    labels = list(_metadata(denoiser_path, "prompt_labels"))
    if not prompts or len(labels) != len(prompts):
        raise QCompileError(f"{Path(denoiser_path).with_suffix('.json')}: 'prompts' and 'prompt_labels' must be "
                            "non-empty lists of the same length")
    picked = [i % len(prompts) for i in range(n)]
    return [prompts[i] for i in picked], np.array([labels[i] for i in picked], dtype=np.int64)


def text_encoder_path(denoiser_path: str | os.PathLike) -> Path:
    """``unet_mnist.onnx`` -> ``unet_mnist.text_encoder.onnx`` (same folder)."""
    path = Path(denoiser_path)
    return path.with_name(f"{path.stem}.text_encoder.onnx")


class TextEncoder:
    """Captions -> (B, L, D) float32 contexts through the tokenizer and the ONNX text encoder."""

    def __init__(self, path: str | os.PathLike, tokenizer: WordTokenizer):
        from qcompiler.runtimes.ort import make_session

        self.path = Path(path)
        if not self.path.exists():
            raise QCompileError(f"{self.path}: text encoder not found (expected beside the float denoiser)")
        self.session = make_session(self.path)
        self.tokenizer = tokenizer

    @classmethod
    def for_denoiser(cls, denoiser_path: str | os.PathLike) -> TextEncoder:
        """The text encoder that ships beside a float denoiser, with the vocabulary from its JSON."""
        tokenizer = WordTokenizer(tuple(_metadata(denoiser_path, "vocabulary")),
                                  int(_metadata(denoiser_path, "max_length")))
        return cls(text_encoder_path(denoiser_path), tokenizer)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode_batch(prompts)
        return self.session.run(None, {"input_ids": ids})[0].astype(np.float32)

    def empty(self) -> np.ndarray:
        """The unconditional context (L, D): the encoding of the empty caption."""
        return self([""])[0]
