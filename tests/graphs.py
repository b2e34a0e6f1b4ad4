"""Small hand-built ONNX graphs shared by the tests (built with onnx.helper, IR 10 for ORT)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def linear_model(k: int = 16, n: int = 8, bias: bool = True, seed: int = 0, constant_weight: bool = True):
    """x (B, T, K) → MatMul(W[K, N]) [+ b] → Relu → y."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc")]
    inits = [init("W", rng.standard_normal((k, n)).astype(np.float32))] if constant_weight else []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, k])]
    if not constant_weight:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n]))
    last = "mm"
    if bias:
        inits.append(init("b", rng.standard_normal(n).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["biased"], name="fc_bias"))
        last = "biased"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, n])], inits)


def conv_model(c_in: int = 4, c_out: int = 8, seed: int = 0):
    """x (B, C, 8, 8) → Conv 3×3 → Relu → Conv 1×1 → y."""
    rng = np.random.default_rng(seed)
    inits = [init("w1", rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32) * 0.3),
             init("b1", rng.standard_normal(c_out).astype(np.float32) * 0.1),
             init("w2", rng.standard_normal((c_out, c_out, 1, 1)).astype(np.float32) * 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c_in, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c_out, 8, 8])], inits)


def attention_model(d: int = 8, tokens: int = 4, context_tokens: int = 3, cross: bool = False, seed: int = 0):
    """Self- or cross-attention: softmax(Q·Kᵀ·d^-½)·V with Q/K/V projections."""
    rng = np.random.default_rng(seed)
    inits = [init(name, rng.standard_normal((d, d)).astype(np.float32)) for name in ("Wq", "Wk", "Wv")]
    inits.append(init("scale", np.array(d ** -0.5, dtype=np.float32)))
    kv_source = "ctx" if cross else "x"
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", [kv_source, "Wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", [kv_source, "Wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_mul"),
             helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"], name="av")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, d])]
    if cross:
        inputs.append(helper.make_tensor_value_info("ctx", TensorProto.FLOAT, ["B", context_tokens, d]))
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", tokens, d])], inits)


def layernorm_model(c: int = 8):
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1)]
    inits = [init("gamma", np.linspace(0.5, 1.5, c).astype(np.float32)), init("beta", np.zeros(c, np.float32))]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, c])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, c])], inits)


def instance_groupnorm_model(c: int = 8, groups: int = 2):
    """The exporters' GroupNorm: Reshape → InstanceNormalization → Reshape → Mul(γ) → Add(β)."""
    inits = [init("shape_g", np.array([0, groups, -1], np.int64)), init("ones", np.ones(groups, np.float32)),
             init("zeros", np.zeros(groups, np.float32)), init("shape_back", np.array([0, c, 4, 4], np.int64)),
             init("gamma", np.linspace(0.5, 1.5, c).reshape(c, 1, 1).astype(np.float32)),
             init("beta", np.full((c, 1, 1), 0.1, np.float32))]
    nodes = [helper.make_node("Reshape", ["x", "shape_g"], ["g"], name="to_groups"),
             helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["n"], name="inorm"),
             helper.make_node("Reshape", ["n", "shape_back"], ["nb"], name="from_groups"),
             helper.make_node("Mul", ["nb", "gamma"], ["scaled"], name="gamma_mul"),
             helper.make_node("Add", ["scaled", "beta"], ["y"], name="beta_add")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", c, 4, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", c, 4, 4])], inits)


def skip_concat_model(c: int = 4, feeds_conv: bool = True):
    """concat(h, skip) → Conv 1×1 (UNet decoder shortcut), or → Relu (no match)."""
    rng = np.random.default_rng(0)
    inits = [init("w", rng.standard_normal((c, 2 * c, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="h"),
             helper.make_node("Concat", ["h", "skip"], ["cat"], name="skip_cat", axis=1)]
    nodes.append(helper.make_node("Conv", ["cat", "w"], ["y"], name="shortcut") if feeds_conv
                 else helper.make_node("Relu", ["cat"], ["y"], name="after_cat"))
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", c, 4, 4]) for name in ("x", "skip")]
    out_channels = c if feeds_conv else 2 * c
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", out_channels, 4, 4])],
                      inits if feeds_conv else [])


def gemm_model(k: int = 16, n: int = 8, trans_b: int = 1, alpha: float = 1.0, bias: bool = True):
    """x (B, K) → Gemm(W, b) → y, as exporters emit a Linear on 2-D input."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [init("W", weight)] + ([init("b", rng.standard_normal(n).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", ["x", "W"] + (["b"] if bias else []), ["y"], name="head", transB=trans_b,
                            alpha=alpha)
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])], inits)
