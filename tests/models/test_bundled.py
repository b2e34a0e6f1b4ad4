"""Tests for the bundled default model (digits ViT) and the data that ships with it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompiler import models

RECORD = json.loads((models.DIGITS_VIT.parent / "digits_vit.json").read_text())


def _session():
    return ort.InferenceSession(str(models.bundled_model_path()), providers=["CPUExecutionProvider"])


def test_bundled_paths_exist():
    assert models.bundled_model_path() == models.DIGITS_VIT
    assert models.BUNDLED_DEFAULT.name == "unet_mnist.onnx" and models.BUNDLED_DEFAULT.with_suffix(".calib").is_dir()
    assert models.bundled_data_dir(split="calib").is_dir()
    assert models.bundled_data_dir(split="heldout").is_dir()
    with pytest.raises(FileNotFoundError, match="train_no_such_model"):
        models.bundled_model_path("no_such_model")


def test_record_describes_this_file():
    # The JSON's figures belong to the ONNX file only if the hash it recorded is this file's.
    assert hashlib.sha256(models.DIGITS_VIT.read_bytes()).hexdigest() == RECORD["onnx_sha256"]


def test_model_loads_with_dynamic_batch():
    session = _session()
    assert [(i.name, i.type) for i in session.get_inputs()] == [("pixels", "tensor(float)")]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 3):
        (logits,) = session.run(None, {"pixels": np.zeros((batch, 1, 8, 8), np.float32)})
        assert logits.shape == (batch, 10)


def test_heldout_accuracy_matches_record():
    session = _session()
    correct = total = 0
    for path in sorted(models.bundled_data_dir(split="heldout").glob("*.npz")):
        data = np.load(path)
        (logits,) = session.run(["logits"], {"pixels": data["pixels"]})
        correct += int((logits.argmax(axis=1) == data["__label__"]).sum())
        total += len(data["__label__"])
    assert total == RECORD["heldout_accuracy_images"]
    # Same model, same images, same runtime and the same argmax as the training script, so
    # the only room for difference is float formatting of correct/total.
    assert abs(correct / total - RECORD["heldout_accuracy"]) < 1e-9


@pytest.mark.parametrize("split", ["calib", "heldout"])
def test_data_files_have_model_input_shapes(split):
    files = sorted(models.bundled_data_dir(split=split).glob("*.npz"))
    assert len(files) == 8          # 64 samples, 8 per file
    for path in files:
        data = np.load(path)
        inputs = [k for k in data.files if not k.startswith("__")]
        assert inputs == ["pixels"]
        assert data["pixels"].shape == (8, 1, 8, 8) and data["pixels"].dtype == np.float32
        # Digits pixels are 0..16, scaled by 1/16.
        assert data["pixels"].min() >= 0.0 and data["pixels"].max() <= 1.0
        if split == "heldout":
            assert data["__label__"].dtype == np.int64 and set(data["__label__"]) <= set(range(10))


def test_calibration_from_train_split_and_heldout_from_test_split():
    pytest.importorskip("torch")
    from qcompiler.models import train_digits_vit

    split = train_digits_vit.load_split()
    for name, x in (("calib", split["x_train"]), ("heldout", split["x_test"])):
        stored = np.concatenate([np.load(p)["pixels"] for p in sorted(models.bundled_data_dir(split=name).glob("*.npz"))])
        assert np.array_equal(stored, x[:len(stored)])
    labels = np.concatenate([np.load(p)["__label__"] for p in sorted(models.bundled_data_dir(split="heldout").glob("*.npz"))])
    assert np.array_equal(labels, split["y_test"][:len(labels)])


def test_graph_has_explicit_attention():
    # Each of the 2 blocks must export as MatMul -> Mul(1/sqrt(d)) -> Softmax -> MatMul, the
    # pattern the attention passes match; a fused or rearranged form would hide it.
    graph = onnx.load(str(models.DIGITS_VIT)).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    for softmax in softmaxes:
        scale = producer[softmax.input[0]]
        assert scale.op_type == "Mul" and producer[scale.input[0]].op_type == "MatMul"
        assert [c.op_type for c in consumers[softmax.output[0]]] == ["MatMul"]
