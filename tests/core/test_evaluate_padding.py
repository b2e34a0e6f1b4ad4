"""``evaluate`` leaves out the positions an attention_mask marks as padding (and only those).

The regression this guards: MiniLM's dmq W8A8 read 11.94, 5.85 and 4.62 dB over last_hidden_state
in three compiles whose attended tokens agreed within 0.2 dB (20.90-21.08 dB); the spread sat in
padding rows, which every consumer of the model masks.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.evaluate import EvalOptions, evaluate

B, S, C = 2, 6, 4


def _model(padding_error: float, attended_error: float) -> onnx.ModelProto:
    """y = x + padding_error·(1 − mask) + attended_error·mask (broadcast over C); z = x summed over S."""
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Sub", ["one", "m3"], ["pad"]),
        helper.make_node("Mul", ["pad", "pad_error"], ["pad_noise"]),
        helper.make_node("Mul", ["m3", "att_error"], ["att_noise"]),
        helper.make_node("Add", ["x", "pad_noise"], ["x1"]),
        helper.make_node("Add", ["x1", "att_noise"], ["y"]),
        helper.make_node("ReduceSum", ["x1", "axis1"], ["z"], keepdims=0),
    ]
    inits = [helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
             helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("pad_error", TensorProto.FLOAT, [], [padding_error]),
             helper.make_tensor("att_error", TensorProto.FLOAT, [], [attended_error])]
    graph = helper.make_graph(nodes, "padding", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, C]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, S])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, C]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [B, C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data():
    rng = np.random.default_rng(0)
    mask = np.ones((B, S), np.int64)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    return [{"x": rng.normal(size=(B, S, C)).astype(np.float32), "attention_mask": mask}]


def test_padding_error_is_left_out_of_masked_outputs():
    reference = _model(0.0, 0.0)
    noisy = _model(100.0, 0.01)  # huge error on padding, small on attended tokens
    masked = evaluate(reference, noisy, _data(), EvalOptions(per_layer=False, progress=False))
    full = evaluate(reference, noisy, _data(), EvalOptions(per_layer=False, progress=False, mask_input=None))
    assert masked["padding_excluded_by"] == "attention_mask" and full["padding_excluded_by"] is None
    # attended tokens only: x vs x + 0.01 (unit-variance x) ≈ 40 dB; with padding: far below 0 dB
    assert masked["outputs"]["y"]["sqnr_db"] > 30
    assert full["outputs"]["y"]["sqnr_db"] < 0
    assert masked["outputs"]["y"]["max_abs_error"] < 0.02


def test_outputs_without_the_sequence_axes_count_every_element():
    reference = _model(0.0, 0.0)
    noisy = _model(100.0, 0.0)
    masked = evaluate(reference, noisy, _data(), EvalOptions(per_layer=False, progress=False))
    # z is (batch, C): not (batch, seq), so the padding error summed into it is counted
    assert masked["outputs"]["z"]["sqnr_db"] < 0
    assert masked["outputs"]["y"]["sqnr_db"] == float("inf")
