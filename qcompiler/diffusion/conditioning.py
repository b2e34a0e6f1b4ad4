"""Conditioners: prompts -> the denoiser's conditioning input, for text- and class-conditioned denoisers.

The DDIM/CFG sampler, the collector and the evaluation take prompts (``text.prompts_for``)
and never look at what a denoiser is conditioned on; a conditioner turns prompts into the
context rows the denoiser's conditioning input takes, and gives the unconditional context
(the classifier-free guidance half):

- ``TextEncoder`` (``text.py``) for a denoiser with ``encoder_hidden_states`` (the UNet):
  captions -> (B, L, D) float32 through the ONNX text encoder beside the float model; the
  unconditional context is the encoding of ``""``.
- ``ClassLabels`` for a denoiser with ``class_labels`` (the DiT): each prompt names one class of
  ``class_names`` (from ``<denoiser>.json``), by its name ("seven") or its index as a numeral
  ("7"), and maps to that label (B,) int64; the empty prompt ``""`` maps to the null class
  (``null_class`` in the JSON, default ``len(class_names)``: the extra row of a DiT's
  label-embedding table that training's label dropout uses).

``conditioner_for(path)`` picks one from the denoiser's inputs (``sampler.condition_input``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from qcompiler.errors import QCompileError


class Conditioner(Protocol):
    def __call__(self, prompts: list[str]) -> np.ndarray:
        """One context row per prompt, stacked on axis 0."""

    def empty(self) -> np.ndarray:
        """The unconditional context: one row, without the batch axis."""


def class_of(prompt: str, class_names: Sequence[str]) -> int | None:
    """The class a prompt names (name or index numeral), None for an empty prompt; ValueError if none or several."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    if not words:
        return None
    names = [name.lower() for name in class_names]
    found = {names.index(w) for w in words if w in names}
    found |= {int(w) for w in words if w.isdigit() and int(w) < len(names)}
    if len(found) != 1:
        what = f"several classes {sorted(found)}" if found else "no class"
        raise ValueError(f"prompt {prompt!r} names {what} of {list(class_names)}; a class-conditioned denoiser "
                         "needs exactly one")
    return found.pop()


class ClassLabels:
    """Prompts -> int64 class labels; ``""`` -> the null class."""

    def __init__(self, class_names: Sequence[str], null_class: int | None = None):
        self.class_names = tuple(class_names)
        self.null_class = len(self.class_names) if null_class is None else int(null_class)

    @classmethod
    def for_denoiser(cls, denoiser_path: str | os.PathLike) -> ClassLabels:
        from qcompiler.diffusion.sampler import model_metadata
        from qcompiler.diffusion.text import _metadata

        return cls(_metadata(denoiser_path, "class_names"), model_metadata(denoiser_path).get("null_class"))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        labels = []
        for prompt in prompts:
            try:
                label = class_of(prompt, self.class_names)
            except ValueError as exc:
                raise QCompileError(str(exc)) from None
            labels.append(self.null_class if label is None else label)
        return np.array(labels, dtype=np.int64)

    def empty(self) -> np.ndarray:
        return np.array(self.null_class, dtype=np.int64)


def conditioner_for(denoiser_path: str | os.PathLike, condition_input: str | None = None) -> Conditioner:
    """The conditioner of a float denoiser (text encoder and JSON are read from beside it).

    ``condition_input`` is the denoiser's conditioning input name; read from the model when None.
    """
    from qcompiler.diffusion.sampler import condition_input_of
    from qcompiler.diffusion.text import TextEncoder

    kind = condition_input or condition_input_of(Path(denoiser_path))
    if kind == "class_labels":
        return ClassLabels.for_denoiser(denoiser_path)
    return TextEncoder.for_denoiser(denoiser_path)
