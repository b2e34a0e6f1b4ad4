"""Small graphs with known outliers for the inspect tests, built in code.

Values are small integers and weights are in {-1, 0, 1} (plus one exact 200), so every product
and sum is exact in float32: ORT's activations equal the float64 numpy reference bitwise, and
outlier counts can be compared exactly.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from tests.graphs import init, make_model

CHANNELS, TOKENS, OUT = 128, 8, 16
OUTLIER_CHANNEL, OUTLIER_VALUE = 5, 512.0
#: The one large weight: input channel OUTLIER_CHANNEL of output WEIGHT_ROW in W2.
WEIGHT_ROW, WEIGHT_VALUE = 3, 200.0


def residual_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W1: a signed permutation that maps the outlier channel to itself; W2: ±1 with one 200 entry."""
    rng = np.random.default_rng(seed)
    others = [c for c in range(CHANNELS) if c != OUTLIER_CHANNEL]
    w1 = np.zeros((CHANNELS, CHANNELS), np.float32)
    w1[others, rng.permutation(others)] = rng.choice([-1.0, 1.0], CHANNELS - 1)
    w1[OUTLIER_CHANNEL, OUTLIER_CHANNEL] = 1.0
    w2 = rng.choice([-1.0, 1.0], (CHANNELS, OUT)).astype(np.float32)
    w2[OUTLIER_CHANNEL, WEIGHT_ROW] = WEIGHT_VALUE
    return w1, w2


def residual_model(seed: int = 0):
    """x (B, T, C) → MatMul W1 → h1;  s = h1 + x (residual sum);  s → MatMul W2 → y.

    Watched: x (input of the first Linear) and s (residual sum, input of the second Linear).
    """
    w1, w2 = residual_weights(seed)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "x"], ["s"], name="residual"),
             helper.make_node("MatMul", ["s", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", TOKENS, CHANNELS])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", TOKENS, OUT])],
                      [init("W1", w1), init("W2", w2)])


def residual_feeds(files: int = 2, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Integers in [-4, 4] with OUTLIER_VALUE in channel OUTLIER_CHANNEL of token 0 of every sample."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(files):
        x = rng.integers(-4, 5, (batch, TOKENS, CHANNELS)).astype(np.float32)
        x[:, 0, OUTLIER_CHANNEL] = OUTLIER_VALUE
        feeds.append({"x": x})
    return feeds


def reference_activations(feeds: list[dict[str, np.ndarray]], seed: int = 0) -> dict[str, np.ndarray]:
    """x and s = x·W1 + x over all samples, in float64 (exact: see the module docstring)."""
    w1, _ = residual_weights(seed)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    return {"x": x, "s": x @ w1 + x}


def cross_attention_feeds(model_weights: dict[str, np.ndarray], batches: int = 2, batch: int = 3,
                          tokens: int = 4, context_tokens: int = 5, seed: int = 2) -> list[dict[str, np.ndarray]]:
    """Random x and context, with context token 0 pointed along the queries' mean key direction.

    ctx_0 = 4 · Wk·q̄ / ‖Wk·q̄‖ (q̄ the sample's mean query) makes q·k_0 large for most queries:
    key 0 becomes the sink (start token) that cross-attention outliers are about.
    """
    rng = np.random.default_rng(seed)
    d = model_weights["Wq"].shape[0]
    feeds = []
    for _ in range(batches):
        x = rng.standard_normal((batch, tokens, d)).astype(np.float32)
        ctx = rng.standard_normal((batch, context_tokens, d)).astype(np.float32)
        direction = (x @ model_weights["Wq"]).mean(axis=1) @ model_weights["Wk"].T
        ctx[:, 0] = 4 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
        feeds.append({"x": x, "ctx": ctx})
    return feeds
