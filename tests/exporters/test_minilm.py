"""Tests for the MiniLM exporter and its stdlib-docstring text corpus."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qcompiler.exporters import minilm, text_corpus

SEQ_LEN = 32        # short sequences keep the export test fast; the axis is dynamic anyway
SAMPLES = 16        # two files of 8 per split
CLS_ID, SEP_ID = 101, 102   # BERT uncased vocab.txt: [CLS] and [SEP]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    return minilm.export_minilm(out, seq_len=SEQ_LEN, calib_samples=SAMPLES, heldout_samples=SAMPLES)


def _reference_embedding(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """sentence-transformers' pipeline for this model, computed independently of the exporter.

    BertModel's last_hidden_state, then mean over tokens where attention_mask is 1, then
    division by the L2 norm (modules.json: Transformer -> Pooling(mean) -> Normalize).
    """
    import torch
    from transformers import BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = BertModel.from_pretrained(minilm.model_dir(), local_files_only=True).eval()
    with torch.no_grad():
        hidden = bert(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()
    mask = inputs["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_corpus_is_deterministic_and_split_disjoint():
    passages = text_corpus.build_corpus()
    assert passages == text_corpus.build_corpus()
    assert len(passages) == len(set(passages))
    calibration, held_out = text_corpus.split_corpus(passages)
    assert not set(calibration) & set(held_out)
    assert len(calibration) + len(held_out) == len(passages)
    # Enough text for the default 64 + 64 samples, and every passage within the length bounds.
    assert min(len(calibration), len(held_out)) >= 64
    assert all(text_corpus.MIN_CHARS <= len(p) <= text_corpus.MAX_CHARS for p in passages)


@pytest.mark.slow
def test_onnx_sentence_embedding_matches_torch(exported):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported["model"]), providers=["CPUExecutionProvider"])
    inputs = dict(np.load(sorted(exported["heldout"].glob("*.npz"))[0]))
    (embedding,) = session.run(["sentence_embedding"], inputs)
    # Same float32 math in two runtimes: only summation order differs (~1e-6 measured),
    # so 1e-4 catches any wrong op while allowing kernel differences.
    assert np.abs(embedding - _reference_embedding(inputs)).max() < 1e-4
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_calibration_and_heldout_folders(exported):
    for split in ("calib", "heldout"):
        files = sorted(exported[split].glob("*.npz"))
        assert [f.name for f in files] == ["0000.npz", "0001.npz"]
        for path in files:
            data = np.load(path)
            assert sorted(data.files) == sorted(minilm.INPUT_NAMES)
            for name in minilm.INPUT_NAMES:
                assert data[name].shape == (8, SEQ_LEN) and data[name].dtype == np.int64
            assert (data["input_ids"][:, 0] == CLS_ID).all()
            lengths = data["attention_mask"].sum(axis=1)
            # Every row ends in [SEP] at its last real token, padding after it.
            assert (data["input_ids"][np.arange(8), lengths - 1] == SEP_ID).all()
            assert set(np.unique(data["attention_mask"])) <= {0, 1}


@pytest.mark.slow
def test_npz_holds_the_recorded_texts_and_they_are_disjoint(exported):
    texts = json.loads(exported["texts"].read_text())
    assert len(texts["calib"]) == len(texts["heldout"]) == SAMPLES
    assert not set(texts["calib"]) & set(texts["heldout"])
    tokenizer = text_corpus.load_tokenizer(minilm.model_dir() / "tokenizer.json", SEQ_LEN)
    for split in ("calib", "heldout"):
        stored = [np.load(p)["input_ids"] for p in sorted(exported[split].glob("*.npz"))]
        assert np.array_equal(np.concatenate(stored), text_corpus.tokenize(tokenizer, texts[split])["input_ids"])


@pytest.mark.slow
def test_rerun_with_same_settings_keeps_the_export(exported, capsys):
    before = exported["model"].stat().st_mtime_ns
    again = minilm.export_minilm(exported["model"].parent, seq_len=SEQ_LEN,
                                 calib_samples=SAMPLES, heldout_samples=SAMPLES)
    assert again["model"].stat().st_mtime_ns == before
    assert "kept" in capsys.readouterr().out
