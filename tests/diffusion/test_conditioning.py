"""Class-conditioned denoisers (the DiT) through the same sampler and collector, and the conditioners."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.diffusion.collect import collect
from qcompiler.diffusion.conditioning import ClassLabels, class_of, conditioner_for
from qcompiler.diffusion.sampler import (
    OnnxDenoiser,
    condition_input_of,
    config_for,
    sample,
)
from qcompiler.diffusion.text import TextEncoder, prompts_for
from qcompiler.errors import QCompileError
from qcompiler.models.mnist_data import DIGIT_WORDS


def test_class_of_reads_names_and_numerals(tiny_dit):
    captions, labels = prompts_for(80, tiny_dit)
    assert [class_of(c, DIGIT_WORDS) for c in captions] == labels.tolist()
    assert class_of("", DIGIT_WORDS) is None and class_of("  ", DIGIT_WORDS) is None
    with pytest.raises(ValueError, match="no class"):
        class_of("a handwritten digit", DIGIT_WORDS)
    with pytest.raises(ValueError, match=r"several classes \[3, 7\]"):
        class_of("a three or a 7", DIGIT_WORDS)
    assert class_of("a Cat", ("dog", "cat")) == 1 and class_of("class 0", ("dog", "cat")) == 0


def test_class_labels_map_prompts_and_the_empty_prompt_to_the_null_class(tiny_dit):
    condition = ClassLabels(DIGIT_WORDS)
    captions, labels = prompts_for(12, tiny_dit)
    np.testing.assert_array_equal(condition(captions), labels)
    assert condition(captions).dtype == np.int64
    assert condition.empty().shape == () and int(condition.empty()) == 10
    with pytest.raises(QCompileError, match="no class"):
        condition(["a picture"])


def test_conditioner_follows_the_denoiser_inputs(tiny_denoiser, tiny_dit):
    assert condition_input_of(tiny_denoiser) == "encoder_hidden_states"
    assert condition_input_of(tiny_dit) == "class_labels"
    assert isinstance(conditioner_for(tiny_denoiser), TextEncoder)
    condition = conditioner_for(tiny_dit)
    assert isinstance(condition, ClassLabels) and condition.null_class == 10   # from tiny_dit.json


def _plain_denoiser(path, condition_inputs):
    """A graph that returns ``sample`` (Identity): a denoiser in name only."""
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 1, 32, 32]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", 4]) for name in condition_inputs]
    nodes = [helper.make_node("Identity", ["sample"], ["noise_pred"])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["B", 1, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), path)
    return path


@pytest.mark.parametrize("inputs, what", [(["context"], "neither"), (["encoder_hidden_states", "class_labels"], "both")])
def test_a_denoiser_needs_exactly_one_conditioning_input(tmp_path, inputs, what):
    path = _plain_denoiser(tmp_path / "odd.onnx", inputs)
    for make in (OnnxDenoiser, condition_input_of):
        with pytest.raises(QCompileError, match=f"encoder_hidden_states.*class_labels.*it has {what}"):
            make(path)


def test_sampler_drives_a_class_conditioned_denoiser(tiny_dit):
    denoiser = OnnxDenoiser(tiny_dit)
    assert denoiser.condition_input == "class_labels"
    condition = conditioner_for(tiny_dit)
    labels, config = condition(prompts_for(3, tiny_dit)[0]), config_for(tiny_dit, steps=2)
    images = sample(denoiser, labels, condition.empty(), [0, 1, 2], config)
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.float32 and np.isfinite(images).all()
    # Deterministic per seed, independent of the batch it is drawn in.
    np.testing.assert_array_equal(images, sample(denoiser, labels, condition.empty(), [0, 1, 2], config))
    one_by_one = sample(denoiser, labels, condition.empty(), [0, 1, 2], replace(config, batch_size=1))
    np.testing.assert_allclose(images, one_by_one, atol=1e-4)
    assert not np.allclose(images[0], images[1])
    # The label matters: same seed, another digit, another image.
    other = sample(denoiser, (labels + 5) % 10, condition.empty(), [0, 1, 2], config)
    assert not np.allclose(images, other)
    # Guidance is a no-op when the unconditional label is the prompt's own.
    runs = [sample(denoiser, labels[:1], labels[0], [0], replace(config, guidance_scale=w)) for w in (1.0, 7.5)]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


def test_collector_writes_class_labels_and_timesteps(tiny_dit, tmp_path):
    config = config_for(tiny_dit, steps=3, batch_size=2)
    result = collect(tiny_dit, tmp_path, prompts=3, config=config)
    files = sorted(tmp_path.glob("*.npz"))
    assert result.files == len(files) == 6 and result.timesteps == (667, 334, 1)
    _, labels = prompts_for(3, tiny_dit)
    for path in files:
        data = np.load(path)
        assert {k for k in data.files if not k.startswith("__")} == {"sample", "timestep", "class_labels"}
        rows = len(data["sample"]) // 2
        batch = int(path.name[1:4])
        assert data["class_labels"].dtype == np.int64
        # Unconditional half: the null class (metadata label -1); conditional half: the prompted digits.
        np.testing.assert_array_equal(data["class_labels"][:rows], 10)
        np.testing.assert_array_equal(data["class_labels"][rows:], labels[2 * batch:2 * batch + rows])
        np.testing.assert_array_equal(data["__label__"][:rows], -1)
        np.testing.assert_array_equal(data["__timestep__"], data["timestep"].astype(np.int64))
        assert len(set(data["__timestep__"].tolist())) == 1
