"""Prompts, tokenizer and the exported text encoder's start-token column."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.diffusion.text import TextEncoder, prompts_for, text_encoder_path
from qcompiler.errors import QCompileError
from qcompiler.models.mnist_data import MAX_LENGTH, TEMPLATES, Tokenizer


def test_prompts_cover_every_digit_and_template(tiny_denoiser):
    captions, labels = prompts_for(10 * len(TEMPLATES), tiny_denoiser)
    assert np.bincount(labels).tolist() == [len(TEMPLATES)] * 10
    assert len(set(captions)) == len(captions)
    assert captions[:2] == ["a handwritten digit zero", "a handwritten digit one"]
    more, _ = prompts_for(10 * len(TEMPLATES) + 3, tiny_denoiser)  # cycled
    assert more[-3:] == captions[:3]


def test_a_bare_denoiser_without_a_prompt_list_is_refused(tmp_path):
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(QCompileError, match=r"d\.json: no 'prompts'"):
        prompts_for(2, tmp_path / "d.onnx")


def test_tokenizer_puts_bos_first_and_pads():
    tokenizer = Tokenizer.from_templates()
    ids = tokenizer.encode("a handwritten digit seven")
    vocabulary = tokenizer.vocabulary
    assert [vocabulary[i] for i in ids] == (["<bos>", "a", "handwritten", "digit", "seven", "<eos>"]
                                            + ["<pad>"] * (MAX_LENGTH - 6))
    assert [vocabulary[i] for i in tokenizer.encode("")[:3]] == ["<bos>", "<eos>", "<pad>"]
    with pytest.raises(ValueError, match="at most"):
        tokenizer.encode(" ".join(["digit"] * MAX_LENGTH))


def test_text_encoder_sits_beside_the_denoiser(tiny_denoiser):
    assert text_encoder_path(tiny_denoiser).name == "tiny.text_encoder.onnx"


def test_start_token_column_does_not_depend_on_the_prompt(tiny_denoiser):
    # Causal self-attention: <bos> at position 0 attends only to itself (Stable Diffusion's CLIP too).
    contexts = TextEncoder.for_denoiser(tiny_denoiser)(prompts_for(10, tiny_denoiser)[0] + [""])
    np.testing.assert_allclose(contexts[:, 0], np.broadcast_to(contexts[0, 0], contexts[:, 0].shape), atol=1e-6)
    assert not np.allclose(contexts[0, 5], contexts[1, 5])
