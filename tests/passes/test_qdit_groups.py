"""qdit_groups (Q-DiT): scaled group sizes, the evolutionary search, and the integer lowering vs its reference."""

import numpy as np
import pytest

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError, QCompileError
from qcompiler.lowering.dynamic_groups import activation_params, reference
from qcompiler.passes import QditGroups
from qcompiler.passes.qdit_groups import PAPER_SIZES, evolve, scaled_sizes
from qcompiler.targets.ort import OrtTarget
from qcompiler.targets.tensorrt import TensorRTTarget
from tests import fold_graphs, graphs
from tests.passes.helpers import context, run_model


def test_sizes_scale_with_the_hidden_width():
    assert scaled_sizes(1152, 1152) == list(PAPER_SIZES)          # DiT-XL: the paper's sizes
    assert scaled_sizes(96, 96) == [3, 6, 12, 16, 24]             # the zoo DiT: ×96/1152, nearest divisor of K
    assert scaled_sizes(384, 96) == [3, 6, 12, 16, 24]            # its fc2 (K = 4·96) keeps the same sizes


def test_search_respects_the_budget_and_finds_the_known_optimum():
    # Additive proxy: layer 0 prefers 32, layer 1 is indifferent; mean ≥ 160 forces layer 1 to 288.
    errors = np.array([[0.0, 1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    config = QditGroups.Config(budget=160)
    best, population = evolve(errors, config.budget, config)
    assert [PAPER_SIZES[c] for c in best] == [32, 288]
    assert all(np.mean([PAPER_SIZES[c] for c in p]) >= 160 for p in population)


def _lowered(model, shapes, mode="integer", **config):
    """The pass (plans only) then the ORT target's lowering of its plans."""
    ctx = context(model, shapes)
    result = QditGroups(QditGroups.Config(**config)).call(ctx)
    assert not result.modified and len(ctx.dynamic_group_plans) > 0  # the pass decides, the target lowers
    OrtTarget(OrtTarget.Config(dynamic_groups=mode)).lower(ctx)
    return ctx, result


@pytest.mark.parametrize("dynamic, mode", [(True, "integer"), (False, "integer"), (True, "simulate")])
def test_lowering_matches_the_numpy_reference(dynamic, mode):
    model = graphs.linear_model(k=16, n=8, bias=False)
    ctx, _ = _lowered(model, {"x": (2, 4, 16)}, mode, sizes=(128,), dynamic=dynamic)
    ops = [n.op for n in ctx.graph.nodes]
    assert ops.count("MatMulIntegerToFloat") == (mode == "integer")
    x = ctx.calibration[0].feeds["x"]
    weight = next(i for i in model.graph.initializer if i.name == "W")
    from onnx import numpy_helper

    w = numpy_helper.to_array(weight)
    group = scaled_sizes(16, 16)[PAPER_SIZES.index(128)]
    static = None
    if not dynamic:  # one range per group from the calibration min/max, as the pass computes it
        stats = ctx.statistics({"x": -1}, progress=False)["x"]
        low = np.minimum(stats.channel_min.reshape(-1, group).min(1), 0)
        high = np.maximum(stats.channel_max.reshape(-1, group).max(1), 0)
        scale = np.maximum((high - low) / 255, 1e-12).astype(np.float32)
        static = (scale.reshape(1, -1, 1), np.clip(np.rint(-low / scale), 0, 255).astype(np.float32).reshape(1, -1, 1))
    expected = np.maximum(reference(x.reshape(-1, 16), w, group, 8, 8, static), 0).reshape(2, 4, 8)  # Relu
    got = run_model(ctx.model(), {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_dynamic_error_stays_within_the_half_step_bound():
    # |X − X̂| ≤ s/2 per token and group, s = (hi − lo)/255: the reference realises exactly that grid.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 24)).astype(np.float32) * np.linspace(0.1, 10, 24, dtype=np.float32)
    scale, zero = activation_params(x, 8, 8)
    rows = x.reshape(6, 3, 8)
    codes = np.clip(np.rint(rows / scale) + zero, 0, 255)
    assert np.all(np.abs((codes - zero) * scale - rows) <= scale / 2 + 1e-6)


def test_searched_block_runs_integer_and_close_to_float():
    model = fold_graphs.block_model()
    ctx, result = _lowered(model, {"x": (2, 4, 8)}, generations=2, population=10, keep=4, mutations=4,
                           crossovers=2)
    assert any(note.startswith("search:") for note in result.notes)
    ops = [n.op for n in ctx.graph.nodes]
    assert ops.count("MatMulIntegerToFloat") == 6 and "MatMul" in ops  # q, k, v, o, fc1, fc2; attention stays float
    feeds = ctx.calibration[0].feeds
    expected, got = run_model(model, feeds), run_model(ctx.model(), feeds)
    # W8A8 with groups of ≤ 8 channels: a few tenths of a percent of the output's range.
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_no_linear_is_no_match_and_search_needs_calibration():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)})
    assert not QditGroups().call(ctx).modified
    with pytest.raises(PassError, match="calibration"):
        QditGroups().requires(CompileContext(fold_graphs.block_model(), QuantSettings()))


def test_tensorrt_refuses_run_time_group_scales():
    ctx = context(graphs.linear_model(k=16, n=8, bias=False), {"x": (2, 4, 16)})
    QditGroups(QditGroups.Config(uniform=128)).call(ctx)
    with pytest.raises(QCompileError, match="not expressible on TensorRT"):
        TensorRTTarget().lower(ctx)
