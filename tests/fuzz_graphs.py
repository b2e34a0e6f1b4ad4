"""Random small ONNX graphs built from the units the passes speak of, for the Hypothesis tests.

A graph is a chain of blocks over one activation. Token blocks act on (B, T, C): Linear (MatMul
+ bias), Gemm-free MLP with GELU (Erf form) or SiLU, LayerNorm, single-head softmax attention
with Q/K/V/out projections, residual Add around any of them. Image blocks act on (B, C, H, W):
Conv 3×3 or 1×1 (+ bias), GroupNorm (as torch exports it), SiLU, a Concat skip followed by a 1×1 Conv.
Every weight is a constant; values are seeded, so a drawn recipe is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto, helper

from tests.graphs import init, make_model

TOKEN_BLOCKS = ("linear", "mlp_gelu", "mlp_silu", "layernorm", "attention")
IMAGE_BLOCKS = ("conv3", "conv1", "groupnorm", "silu", "concat_skip")


@dataclass
class Builder:
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, stem: str, value) -> str:
        name = self.name(stem)
        self.inits.append(init(name, np.asarray(value, np.float32)))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def weight(self, *shape: int, gain: float = 1.0) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        return self.const("w", self.rng.standard_normal(shape) * gain / np.sqrt(fan_in))

    # token blocks -------------------------------------------------------------------------
    def linear(self, x: str, c_in: int, c_out: int) -> str:
        return self.node("Add", [self.node("MatMul", [x, self.weight(c_in, c_out)]),
                                 self.const("b", self.rng.standard_normal(c_out) * 0.1)])

    def gelu(self, x: str) -> str:
        erf = self.node("Erf", [self.node("Div", [x, self.const("sqrt2", np.sqrt(2.0))])])
        half = self.node("Mul", [x, self.const("half", 0.5)])
        return self.node("Mul", [half, self.node("Add", [erf, self.const("one", 1.0)])])

    def silu(self, x: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x])])

    def layernorm(self, x: str, c: int) -> str:
        gamma = 1.0 + self.rng.standard_normal(c) * 0.1
        gamma[self.rng.integers(c)] *= 8.0  # an outlier channel, as trained transformers have
        return self.node("LayerNormalization", [x, self.const("gamma", gamma), self.const("beta", np.zeros(c))],
                         axis=-1)

    def attention(self, x: str, c: int) -> str:
        q, k, v = (self.linear(x, c, c) for _ in range(3))
        kt = self.node("Transpose", [k], perm=[0, 2, 1])
        scores = self.node("Mul", [self.node("MatMul", [q, kt]), self.const("scale", c ** -0.5)])
        probs = self.node("Softmax", [scores], axis=-1)
        return self.linear(self.node("MatMul", [probs, v]), c, c)

    def token_block(self, kind: str, x: str, c: int, residual: bool) -> str:
        if kind == "linear":
            y = self.linear(x, c, c)
        elif kind in ("mlp_gelu", "mlp_silu"):
            hidden = self.linear(x, c, 2 * c)
            y = self.linear(self.gelu(hidden) if kind == "mlp_gelu" else self.silu(hidden), 2 * c, c)
        elif kind == "layernorm":
            y = self.layernorm(x, c)
        else:
            y = self.attention(x, c)
        return self.node("Add", [x, y]) if residual else y

    # image blocks -------------------------------------------------------------------------
    def conv(self, x: str, c_in: int, c_out: int, kernel: int) -> str:
        pads = [kernel // 2] * 4
        return self.node("Conv", [x, self.weight(c_out, c_in, kernel, kernel),
                                  self.const("b", self.rng.standard_normal(c_out) * 0.1)],
                         kernel_shape=[kernel, kernel], pads=pads)

    def groupnorm(self, x: str, c: int, groups: int) -> str:
        """torch's export of GroupNorm: Reshape(B, G, −1) → InstanceNorm → Reshape back → Mul γ → Add β."""
        grouped_shape = self.name("grouped_shape")
        self.inits.append(init(grouped_shape, np.array([0, groups, -1], np.int64)))
        normed = self.node("InstanceNormalization", [self.node("Reshape", [x, grouped_shape]),
                                                     self.const("ones", np.ones(groups)),
                                                     self.const("zeros", np.zeros(groups))], epsilon=1e-5)
        back = self.node("Reshape", [normed, self.node("Shape", [x])])
        gamma = (1.0 + self.rng.standard_normal((c, 1, 1)) * 0.1)
        return self.node("Add", [self.node("Mul", [back, self.const("gamma", gamma)]),
                                 self.const("beta", self.rng.standard_normal((c, 1, 1)) * 0.1)])

    def image_block(self, kind: str, x: str, c: int, residual: bool) -> str:
        if kind in ("conv3", "conv1"):
            y = self.conv(x, c, c, 3 if kind == "conv3" else 1)
        elif kind == "groupnorm":
            y = self.groupnorm(x, c, 2 if c % 2 == 0 else 1)
        elif kind == "silu":
            y = self.silu(x)
        else:
            y = self.conv(self.node("Concat", [x, self.silu(x)], axis=1), 2 * c, c, 1)
        return self.node("Add", [x, y]) if residual else y


def random_model(seed: int, image: bool, blocks: list[tuple[str, bool]], channels: int):
    """(model, input shape without batch) for a chain of (block kind, residual) pairs."""
    b = Builder(np.random.default_rng(seed))
    x = "x"
    shape = [channels, 6, 6] if image else [5, channels]
    for kind, residual in blocks:
        x = b.image_block(kind, x, channels, residual) if image else b.token_block(kind, x, channels, residual)
    # Always end in a GEMM, so every recipe has something to quantize.
    x = b.conv(x, channels, channels, 1) if image else b.linear(x, channels, channels)
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    value = helper.make_tensor_value_info
    return make_model(b.nodes, [value("x", TensorProto.FLOAT, ["B", *shape])],
                      [value("y", TensorProto.FLOAT, ["B", *shape])], b.inits), shape
