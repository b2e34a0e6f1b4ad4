"""mixed_precision: sensitivity per weight, the W8 byte budget, and what quantize_weights makes of it."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import PassError
from qcompiler.passes import MixedPrecision, QuantizeWeights
from qcompiler.calibration.readers import spread_batches
from qcompiler.passes.mixed_precision import LayerCost, choose_w8
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig, simulated_weight
from qcompiler.patterns import find_linears
from tests import graphs
from tests.passes.helpers import context, run_model

#: (name, K, N) of the chain's MatMuls: sizes differ so the byte budget has choices to make.
LAYERS = (("fc1", 32, 64), ("fc2", 64, 64), ("fc3", 64, 32), ("fc4", 32, 32))


def chain_model(outlier_layer: str | None = "fc4", seed: int = 0):
    """x (B, 4, 32) → four MatMul + Relu; ``outlier_layer`` gets one large weight, so int4 blocks hurt it most."""
    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for name, k, n in LAYERS:
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        if name == outlier_layer:
            w[0, :] *= 30.0  # one input row 30x larger: every block's scale set by it
        inits.append(graphs.init(f"W_{name}", w))
        nodes += [helper.make_node("MatMul", [last, f"W_{name}"], [f"{name}_mm"], name=name),
                  helper.make_node("Relu", [f"{name}_mm"], [f"{name}_out"], name=f"{name}_relu")]
        last = f"{name}_out"
    nodes[-1].output[0] = "y"
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 32])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 32])], inits)


def _ctx(model, wbits=4):
    return context(model, {"x": (3, 4, 32)}, wbits=wbits)


def _compile(model, budget, order="per_byte"):
    ctx = _ctx(model)
    config = MixedPrecision.Config(w8_budget=budget, order=order)
    MixedPrecision(config).requires(ctx)
    MixedPrecision(config).call(ctx)
    QuantizeWeights().call(ctx)
    return ctx


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("order", ["per_byte", "sensitivity"])
def test_budget_is_respected(budget, order):
    ctx = _compile(chain_model(), budget, order)
    params = {name: k * n for name, k, n in LAYERS}
    bytes_8 = sum(params[name] for name, bits in ctx.weight_bits.items() if bits == 8)
    total = bytes_8 + sum(p * 4 / 8 for name, p in params.items() if name not in ctx.weight_bits)
    assert bytes_8 / total <= budget
    assert ctx.mixed_precision["w8_share"] == pytest.approx(bytes_8 / total)
    # What quantize_weights wrote follows the choice: int8 DQ for W8 MatMuls, MatMulNBits for the rest.
    ops = [n.op_type for n in ctx.model().graph.node]
    assert ops.count("MatMulNBits") == len(LAYERS) - len(ctx.weight_bits)
    assert ops.count("DequantizeLinear") == len(ctx.weight_bits)


def test_zero_budget_changes_nothing():
    plain = _ctx(chain_model())
    QuantizeWeights().call(plain)
    mixed = _ctx(chain_model())
    assert not MixedPrecision(MixedPrecision.Config(w8_budget=0.0)).call(mixed).modified
    QuantizeWeights().call(mixed)
    assert mixed.weight_bits == {} and mixed.mixed_precision is None
    assert mixed.model().SerializeToString() == plain.model().SerializeToString()


def test_sensitive_layer_is_kept_and_lowers_the_error():
    model = chain_model(outlier_layer="fc4")
    ctx = _compile(model, 0.25)
    layers = ctx.mixed_precision["layers"]
    assert layers[0]["node"] == "fc4"                     # the outlier layer is the most sensitive
    assert [k["node"] for k in ctx.mixed_precision["kept_at_8"]][0] == "fc4"
    assert ctx.weight_bits["fc4"] == 8
    all_w4 = _ctx(model)
    QuantizeWeights().call(all_w4)
    x = np.random.default_rng(9).standard_normal((5, 4, 32)).astype(np.float32)
    reference = run_model(model, {"x": x})
    err_mixed = np.sum((run_model(ctx.model(), {"x": x}, optimize=False) - reference) ** 2)
    err_w4 = np.sum((run_model(all_w4.model(), {"x": x}, optimize=False) - reference) ** 2)
    assert err_mixed < 0.5 * err_w4


def test_sensitivity_matches_direct_computation():
    model = graphs.linear_model(k=64, n=16, bias=False)
    ctx = context(model, {"x": (3, 4, 64)}, wbits=4)
    config = MixedPrecision.Config(w8_budget=0.5, batches=2, rows=2)
    MixedPrecision(config).call(ctx)
    unit = find_linears(context(model, {"x": (3, 4, 64)}, wbits=4).graph)[0]
    w = np.asarray(unit.weight.values, np.float32)
    w_hat = simulated_weight(unit, w, 4, 32, QuantizeWeightsConfig())
    xs = [b.feeds["x"][:2] for b in spread_batches(ctx.calibration, 2)]
    ref = [np.maximum(x @ w, 0) for x in xs]
    err = sum(np.sum((np.maximum(x @ w_hat, 0) - r) ** 2) for x, r in zip(xs, ref)) / sum(np.sum(r**2) for r in ref)
    assert ctx.mixed_precision["layers"][0]["sensitivity"] == pytest.approx(err, rel=1e-4)


def test_sensitivity_order_is_deterministic():
    first, second = _compile(chain_model(), 0.25), _compile(chain_model(), 0.25)
    assert first.mixed_precision["layers"] == second.mixed_precision["layers"]
    sensitivities = [layer["sensitivity"] for layer in first.mixed_precision["layers"]]
    assert sensitivities == sorted(sensitivities, reverse=True)
    # Ties break by node name, whatever order the layers come in.
    tied = [LayerCost("b", 100, 1.0), LayerCost("a", 100, 1.0), LayerCost("c", 100, 2.0)]
    for costs in (tied, tied[::-1]):
        assert [c.node for c in choose_w8(costs, 4, 0.8)] == ["c", "a"]


def test_per_byte_prefers_small_sensitive_layers():
    costs = [LayerCost("big", 1000, 3.0), LayerCost("small1", 100, 1.0), LayerCost("small2", 100, 1.0)]
    # Budget 40%: 'big' alone would be 1000 / (1000 + 100) > 0.4, so plain sensitivity skips it too.
    assert [c.node for c in choose_w8(costs, 4, 0.4, "per_byte")] == ["small1", "small2"]
    assert [c.node for c in choose_w8(costs, 4, 0.95, "sensitivity")][0] == "big"


def test_no_weights_to_choose_changes_nothing():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)}, wbits=4)
    result = MixedPrecision(MixedPrecision.Config(w8_budget=0.5)).call(ctx)
    assert not result.modified and ctx.weight_bits == {} and ctx.mixed_precision["layers"] == []


def test_w8_compile_is_refused():
    with pytest.raises(PassError, match="--wbits 4"):
        MixedPrecision(MixedPrecision.Config(w8_budget=0.1)).requires(_ctx(chain_model(), wbits=8))


def test_config_is_checked():
    with pytest.raises(ValueError, match="w8_budget"):
        MixedPrecision.Config(w8_budget=1.5)
    with pytest.raises(ValueError, match="order"):
        MixedPrecision.Config(order="random")


def test_sensitivity_cache_is_read_back_only_for_the_same_key(tmp_path):
    import json

    cache = tmp_path / "sens.json"
    config = MixedPrecision.Config(w8_budget=0.25, sensitivity_cache=str(cache))
    first = _ctx(chain_model())
    MixedPrecision(config).call(first)
    stored = json.loads(cache.read_text())
    assert [layer["node"] for layer in stored["layers"]] == [layer["node"] for layer in first.mixed_precision["layers"]]
    # Same key: the file's figures are used (tampered here to prove it is read).
    for layer in stored["layers"]:
        layer["sensitivity"] = 1.0 if layer["node"] == "fc1" else 1e-9
    cache.write_text(json.dumps(stored))
    second = _ctx(chain_model())
    MixedPrecision(config).call(second)
    assert second.mixed_precision["layers"][0]["node"] == "fc1"
    # Other weights: another key, measured again.
    third = _ctx(chain_model(outlier_layer="fc2"))
    MixedPrecision(config).call(third)
    assert third.mixed_precision["layers"][0]["node"] == "fc2"
