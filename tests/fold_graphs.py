"""Small hand-built graphs for the scale-folding passes: one per producer a scale can be folded into."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import init, make_model


def _value(name: str, shape) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _linear(rng, name: str, x: str, k: int, n: int, bias: bool = True) -> tuple[list, list, str]:
    """MatMul(x, W[k, n]) [+ b] as exporters write it: nodes, initializers, output name."""
    nodes = [helper.make_node("MatMul", [x, f"{name}.W"], [f"{name}.mm"], name=name)]
    inits = [init(f"{name}.W", (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32))]
    if not bias:
        return nodes, inits, f"{name}.mm"
    nodes.append(helper.make_node("Add", [f"{name}.b", f"{name}.mm"], [f"{name}.out"], name=f"{name}.bias"))
    inits.append(init(f"{name}.b", (0.1 * rng.standard_normal(n)).astype(np.float32)))
    return nodes, inits, f"{name}.out"


def _layernorm(name: str, x: str, gamma: np.ndarray, beta: np.ndarray | None) -> tuple[list, list]:
    inputs = [x, f"{name}.g"] + ([f"{name}.b"] if beta is not None else [])
    inits = [init(f"{name}.g", gamma.astype(np.float32))]
    inits += [init(f"{name}.b", beta.astype(np.float32))] if beta is not None else []
    return [helper.make_node("LayerNormalization", inputs, [f"{name}.out"], name=name, axis=-1)], inits


def _gelu(x: str, out: str) -> tuple[list, list]:
    """GELU in the Erf form the PyTorch exporter writes: x·(1 + erf(x/√2))·0.5."""
    nodes = [helper.make_node("Div", [x, "sqrt2"], [f"{out}.div"], name=f"{out}.Div"),
             helper.make_node("Erf", [f"{out}.div"], [f"{out}.erf"], name=f"{out}.Erf"),
             helper.make_node("Add", [f"{out}.erf", "one"], [f"{out}.add"], name=f"{out}.Add"),
             helper.make_node("Mul", [x, f"{out}.add"], [f"{out}.mul"], name=f"{out}.Mul"),
             helper.make_node("Mul", [f"{out}.mul", "half"], [out], name=f"{out}.Mul_1")]
    return nodes, [init("sqrt2", np.array(np.sqrt(2), np.float32)), init("one", np.array(1, np.float32)),
                   init("half", np.array(0.5, np.float32))]


def _attention(rng, x: str, d: int, heads: int, scrambled: bool) -> tuple[list, list, str]:
    """Multi-head self-attention on x: Q/K/V projections, head split, softmax(QKᵀ/√D)·V, merge, out-proj.

    ``scrambled`` merges heads as (D, H) instead of (H, D): a valid graph whose channel order
    differs from V's, so V's projection must not absorb the out-projection's scale.
    """
    head_dim = d // heads
    nodes, inits = [], [init("split_shape", np.array([0, 0, heads, head_dim], np.int64)),
                        init("merge_shape", np.array([0, 0, d], np.int64)),
                        init("inv_sqrt_d", np.array(head_dim ** -0.5, np.float32))]
    for name in ("q", "k", "v"):
        n, i, out = _linear(rng, name, x, d, d)
        nodes += n + [helper.make_node("Reshape", [out, "split_shape"], [f"{name}.heads"], name=f"{name}.split")]
        inits += i
    nodes += [helper.make_node("Transpose", ["q.heads"], ["q.t"], name="q.t", perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k.heads"], ["k.t"], name="k.t", perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v.heads"], ["v.t"], name="v.t", perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["q.t", "k.t"], ["scores"], name="qk"),
              helper.make_node("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale"),
              helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v.t"], ["context"], name="pv"),
              helper.make_node("Transpose", ["context"], ["context.t"], name="context.t",
                               perm=[0, 2, 3, 1] if scrambled else [0, 2, 1, 3]),
              helper.make_node("Reshape", ["context.t", "merge_shape"], ["merged"], name="merge")]
    n, i, out = _linear(rng, "o", "merged", d, d)
    return nodes + n, inits + i, out


def block_model(d: int = 8, heads: int = 2, tokens: int = 4, post_ln: bool = False, scrambled: bool = False,
                seed: int = 0):
    """A transformer block: LN1 → attention → +x → LN2 → fc1 → GELU → fc2 → + → y.

    Pre-LN (default): LN outputs feed only the GEMMs, so LN1 absorbs the Q/K/V scale and LN2 the
    fc1 scale. ``post_ln``: the residuals read the LN outputs instead (BERT), so neither can.
    The fc2 input (after GELU) never has an absorbing producer.
    """
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 2.0, d), 0.5 * rng.standard_normal(d)
    nodes, inits = _layernorm("ln1", "x", gamma, beta)
    n, i, attention = _attention(rng, "ln1.out", d, heads, scrambled)
    nodes, inits = nodes + n, inits + i
    nodes.append(helper.make_node("Add", [attention, "ln1.out" if post_ln else "x"], ["h"], name="residual1"))
    n, i = _layernorm("ln2", "h", gamma[::-1].copy(), beta[::-1].copy())
    nodes, inits = nodes + n, inits + i
    n, i, hidden = _linear(rng, "fc1", "ln2.out", d, 4 * d)
    nodes, inits = nodes + n, inits + i
    n, i = _gelu(hidden, "gelu")
    nodes, inits = nodes + n, inits + i
    n, i, out = _linear(rng, "fc2", "gelu", 4 * d, d)
    nodes, inits = nodes + n, inits + i
    nodes.append(helper.make_node("Add", [out, "ln2.out" if post_ln else "h"], ["y"], name="residual2"))
    return make_model(nodes, [_value("x", ["B", tokens, d])], [_value("y", ["B", tokens, d])], inits)


def norm_conv_model(kind: str = "group", c: int = 8, groups: int = 2, seed: int = 0):
    """x (B, C, 4, 4) → GroupNorm (GroupNormalization-21 or the InstanceNorm form) → Conv 1×1 → y."""
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    inits = [init("w", (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)),
             init("bias", (0.1 * rng.standard_normal(c)).astype(np.float32))]
    if kind == "group":
        nodes = [helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["n"], name="gn", num_groups=groups)]
        inits += [init("gamma", gamma), init("beta", beta)]
    else:
        inits += [init("shape_g", np.array([0, groups, -1], np.int64)), init("ones", np.ones(groups, np.float32)),
                  init("zeros", np.zeros(groups, np.float32)), init("shape_back", np.array([0, c, 4, 4], np.int64)),
                  init("gamma", gamma.reshape(c, 1, 1)), init("beta", beta.reshape(c, 1, 1))]
        nodes = [helper.make_node("Reshape", ["x", "shape_g"], ["g"], name="to_groups"),
                 helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["in"], name="inorm"),
                 helper.make_node("Reshape", ["in", "shape_back"], ["nb"], name="from_groups"),
                 helper.make_node("Mul", ["nb", "gamma"], ["scaled"], name="gamma_mul"),
                 helper.make_node("Add", ["scaled", "beta"], ["n"], name="beta_add")]
    nodes.append(helper.make_node("Conv", ["n", "w", "bias"], ["y"], name="conv"))
    return make_model(nodes, [_value("x", ["B", c, 4, 4])], [_value("y", ["B", c, 4, 4])], inits, opset=21)


def linear_chain_model(k: int = 8, n: int = 12, first_bias: bool = True, seed: int = 0):
    """x (B, 4, K) → fc1 [+ b1] → fc2 + b2 → y: fc1's output channels can absorb fc2's scale."""
    rng = np.random.default_rng(seed)
    nodes, inits, hidden = _linear(rng, "fc1", "x", k, n, bias=first_bias)
    more_nodes, more_inits, out = _linear(rng, "fc2", hidden, n, k)
    nodes += more_nodes + [helper.make_node("Identity", [out], ["y"], name="out")]
    return make_model(nodes, [_value("x", ["B", 4, k])], [_value("y", ["B", 4, k])], inits + more_inits)


def gemm_chain_model(k: int = 8, n: int = 12, seed: int = 0):
    """x (B, K) → Gemm(transB, α = 0.5) → Gemm(transB) → y, as exporters write Linear on 2-D input."""
    rng = np.random.default_rng(seed)
    inits = [init("W1", rng.standard_normal((n, k)).astype(np.float32)), init("b1", rng.standard_normal(n).astype(
             np.float32)), init("W2", rng.standard_normal((k, n)).astype(np.float32)),
             init("b2", rng.standard_normal(k).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="gemm1", transB=1, alpha=0.5),
             helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="gemm2", transB=1)]
    return make_model(nodes, [_value("x", ["B", k])], [_value("y", ["B", k])], inits)


def conv_chain_model(c: int = 4, hidden: int = 8, second_kernel: int = 1, seed: int = 0):
    """x (B, C, 8, 8) → Conv 3×3 (padded) → Conv k×k → y: the first Conv absorbs the second's scale.

    With ``second_kernel`` 3 the second Conv pads too, so a shift of its input is not exact.
    """
    rng = np.random.default_rng(seed)
    pad = second_kernel // 2
    inits = [init("w1", (0.3 * rng.standard_normal((hidden, c, 3, 3))).astype(np.float32)),
             init("b1", (0.1 * rng.standard_normal(hidden)).astype(np.float32)),
             init("w2", (0.3 * rng.standard_normal((c, hidden, second_kernel, second_kernel))).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2", pads=[pad] * 4)]
    return make_model(nodes, [_value("x", ["B", c, 8, 8])], [_value("y", ["B", c, 8, 8])], inits)


def activation_linear_model(activation: str = "gelu", k: int = 8, n: int = 16, seed: int = 0):
    """x → fc1 → GELU (Erf form) or SiLU (x·sigmoid(x)) → fc2 → y: nothing can absorb fc2's scale."""
    rng = np.random.default_rng(seed)
    nodes, inits, hidden = _linear(rng, "fc1", "x", k, n)
    if activation == "gelu":
        act_nodes, act_inits = _gelu(hidden, "act")
    else:
        act_nodes, act_inits = [helper.make_node("Sigmoid", [hidden], ["sig"], name="sigmoid"),
                                helper.make_node("Mul", [hidden, "sig"], ["act"], name="silu")], []
    more_nodes, more_inits, out = _linear(rng, "fc2", "act", n, k)
    nodes += act_nodes + more_nodes + [helper.make_node("Identity", [out], ["y"], name="out")]
    return make_model(nodes, [_value("x", ["B", 4, k])], [_value("y", ["B", 4, k])], inits + act_inits + more_inits)


def outlier_model(c: int = 16, n: int = 16, channel: int = 3, gain: float = 40.0, offset: float = 15.0,
                  use_beta: bool = True, seed: int = 0):
    """x → LayerNorm → fc → y where γ, β put a systematic outlier in one channel of the fc input.

    Channel ``channel`` of the LN output is gain·N(0, 1) + offset on normal inputs, the others
    are N(0, 1)-like: the way real transformers' LN outputs carry outliers (docs/algorithms.md §8). Its
    weight row is divided by ``gain``, as trained weights do, so it does not drown the output.
    Without ``use_beta`` the LayerNorm has no bias input (``offset`` is then unused).
    """
    rng = np.random.default_rng(seed)
    gamma, beta = np.ones(c), np.zeros(c)
    gamma[channel], beta[channel] = gain, offset
    nodes, inits = _layernorm("ln", "x", gamma, beta if use_beta else None)
    more_nodes, more_inits, out = _linear(rng, "fc", "ln.out", c, n)
    weight = more_inits[0]
    weight.CopyFrom(init(weight.name, numpy_helper.to_array(weight) * np.where(np.arange(c) == channel, 1 / gain,
                                                                               1)[:, None].astype(np.float32)))
    nodes += more_nodes + [helper.make_node("Identity", [out], ["y"], name="out")]
    return make_model(nodes, [_value("x", ["B", 8, c])], [_value("y", ["B", 8, n])], inits + more_inits)
