"""learned_scales (DMQ LES): γ learned on the quantized layer output, folded exactly; timestep weighting."""

import sys

import numpy as np
import pytest

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import QCompileError
from qcompiler.pass_manager import EXACT_RTOL, ManagerOptions, PassManager
from qcompiler.passes import InsertActivationQDQ, LearnedScales, QuantizeWeights
from qcompiler.les_training import holdout_items, learn_gamma
from qcompiler.passes.learned_scales import (TimestepWeights, collect_inputs, held_out_samples, import_torch,
                                             sample_timesteps, select_samples, timestep_weights)
from qcompiler.quant import sqnr_db
from qcompiler.verify import compare_models
from tests import fold_graphs, graphs
from tests.passes.helpers import batches_for, context, run_model

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides):
    settings = {"iterations": 40, "samples": 16, "batch_size": 4, "progress": False}
    return LearnedScales.Config(**{**settings, **overrides})


def _run(ctx, config):
    return PassManager([LearnedScales(config)], ManagerOptions(verify=True, progress=False)).run(ctx)[0]


def _with_timesteps(batches, steps=(900, 500, 100)):
    return [CalibrationBatch(b.feeds, {"__timestep__": np.full(b.batch_size, steps[i % len(steps)])}, b.source)
            for i, b in enumerate(batches)]


def test_timestep_weight_formula():
    losses = np.array([1.0, 1.0, 2.0])
    np.testing.assert_allclose(timestep_weights(losses, 20.0), (1 - losses / 4.0) ** 20)
    np.testing.assert_allclose(timestep_weights(losses, 1.0), [0.75, 0.75, 0.5])  # the "linear" variant
    np.testing.assert_allclose(timestep_weights(np.zeros(3)), 1.0)
    weights = TimestepWeights(np.array([10, 10, 20, 30]), np.array([1.0, 3.0, 4.0, 6.0]), momentum=0.95, power=20)
    np.testing.assert_allclose(weights.ema, [2.0, 4.0, 6.0])  # initial L_t: mean loss per timestep
    weights.update(np.array([0, 0, 2]), np.array([4.0, 6.0, 1.0]))
    np.testing.assert_allclose(weights.ema, [0.95 * 2 + 0.05 * 5, 4.0, 0.95 * 6 + 0.05 * 1])
    # a timestep with a larger running loss weighs less: the weights rank the timesteps inversely to L_t
    np.testing.assert_array_equal(np.argsort(weights.weights()), np.argsort(-weights.ema))
    np.testing.assert_allclose(weights.weights(), (1 - weights.ema / weights.ema.sum()) ** 20)


def test_outlier_layer_is_folded_exactly_and_quantizes_better():
    model = fold_graphs.outlier_model()
    ctx = context(model, {"x": (4, 8, 16)}, wbits=4)
    record = _run(ctx, _config(init="ones", lr=0.05, iterations=150))  # verify: exact within 1e-5
    assert record.modified and record.verify["max_relative_error"] <= EXACT_RTOL and ctx.fallbacks == []
    assert "LayerNormalization" in record.notes[0]

    def quantized_sqnr(float_model):
        qctx = CompileContext(float_model, QuantSettings(wbits=4, abits=8), ctx.calibration)
        for pass_ in (QuantizeWeights(), InsertActivationQDQ()):
            pass_.call(qctx)
        feeds = batches_for(model, {"x": (4, 8, 16)}, count=1, seed=7)[0].feeds
        return sqnr_db(run_model(model, feeds), run_model(qctx.model(), feeds))

    before, after = quantized_sqnr(model), quantized_sqnr(ctx.model())
    assert after > before + 1.0, (before, after)  # measured improvement of the quantized layer output


def test_guard_never_worse_than_identity():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)}, wbits=8)
    record = _run(ctx, _config(iterations=5))
    note = next(note for note in record.notes if "median ×" in note)
    assert "held-out samples" in note
    assert float(note.split("median ×")[1].split(",")[0]) <= 1.0


class _ShiftProblem:
    """A stand-in GroupProblem: ℓ_n(γ) = mean_c (log γ_c − a_n)², item n's optimum log γ = a_n."""

    def __init__(self, targets):
        self.targets = torch.tensor(targets, dtype=torch.float32)

    @property
    def items(self):
        return len(self.targets)

    def losses(self, gamma, index):
        return ((torch.log(gamma)[None, :] - self.targets[index][:, None]) ** 2).mean(dim=1)

    def pool_losses(self, gamma, chunk=16, items=None, clip_ratios=None):
        items = np.arange(self.items) if items is None else np.asarray(items)
        with torch.no_grad():
            return self.losses(gamma, torch.from_numpy(items.astype(np.int64))).numpy().astype(np.float64)


def test_held_out_error_stops_training_and_guards_gamma():
    config = _config(iterations=60, lr=0.05, check_every=5, patience=2)
    held = np.arange(12, 16)
    # held-out items want γ = e^-1 while the training items pull towards e^+1: every step raises the
    # held-out error, so the best held-out θ is the start and γ = 1 is kept (never accepted worse)
    against = learn_gamma(torch, _ShiftProblem([1.0] * 12 + [-1.0] * 4), np.ones(3), config, None, held_out=held)
    assert against["best_step"] == 0 and np.all(against["gamma"] == 1.0)
    assert against["errors"]["learned"] <= against["errors"]["ones"] == pytest.approx(1.0)
    # held-out items that agree with training: γ moves and the held-out error falls
    along = learn_gamma(torch, _ShiftProblem([1.0] * 16), np.ones(3), config, None, held_out=held)
    assert along["best_step"] > 0 and along["kept"] == "learned" and np.all(along["gamma"] > 1.2)
    assert along["errors"]["learned"] < 0.5 * along["errors"]["ones"]
    # a gain below min_gain does not count: γ = 1 is kept
    short = {"iterations": 5, "lr": 0.05, "check_every": 5}  # log γ ≈ 0.25: the held-out error falls ~44%
    loose = learn_gamma(torch, _ShiftProblem([1.0] * 16), np.ones(3), _config(**short), None, held_out=held)
    strict = learn_gamma(torch, _ShiftProblem([1.0] * 16), np.ones(3), _config(**short, min_gain=0.6), None,
                         held_out=held)
    assert 0.4 < loose["errors"]["learned"] / loose["errors"]["ones"] < 0.9 and loose["kept"] == "learned"
    assert strict["kept"] == "ones" and np.all(strict["gamma"] == 1.0)
    # without held-out items: the old behaviour, trained and judged on every item
    plain = learn_gamma(torch, _ShiftProblem([1.0] * 12 + [-1.0] * 4), np.ones(3), config, None)
    assert plain["judged_on"] == "all" and plain["kept"] == "learned" and np.all(plain["gamma"] > 1.0)


def test_held_out_samples_are_whole_batches_spread_over_the_calibration():
    batches = [CalibrationBatch({"x": np.zeros((2, 1))}, {}, f"b{i}") for i in range(8)]
    held, every = held_out_samples(batches, 0.25)
    assert every == 4 and list(held) == [6, 7, 14, 15]  # batches 3 and 7, both rows each
    held, every = held_out_samples(batches[:2], 0.25)  # fewer batches than 4: every 4th sample
    assert list(held) == [3]
    assert len(held_out_samples(batches, 0.0)[0]) == 0
    # a group input with 3 rows per sample (e.g. (B·T, C)): all rows of the held-out samples
    assert list(holdout_items(np.repeat(np.arange(4), 3), 12, np.array([3]), 4)) == [9, 10, 11]
    assert list(holdout_items(None, 8, np.array([3]), 4)) == [3, 7]  # no row map: interleaved items


def test_block_with_attention_and_gelu_fallback_stays_exact():
    model = fold_graphs.block_model()
    ctx = context(model, {"x": (2, 4, 8)})
    record = _run(ctx, _config(lr=0.05))
    assert record.verify["max_relative_error"] <= EXACT_RTOL
    assert any("'gelu'" in fallback for fallback in ctx.fallbacks)  # explicit Mul after GELU
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


@pytest.mark.parametrize("model, shape", [(fold_graphs.norm_conv_model("instance"), (2, 8, 4, 4)),
                                          (fold_graphs.conv_chain_model(), (2, 4, 8, 8))])
def test_conv_groups_stay_exact(model, shape):
    ctx = context(model, {"x": shape})
    record = _run(ctx, _config(lr=0.05, init="ones"))
    assert record.verify["max_relative_error"] <= EXACT_RTOL


def test_no_constant_weight_is_no_match():
    ctx = context(graphs.linear_model(constant_weight=False), {"x": (2, 4, 16), "W": (16, 8)})
    assert not LearnedScales(_config()).call(ctx).modified


def test_timestep_weighting_needs_timesteps():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)})
    notes = LearnedScales(_config(iterations=3)).call(ctx).notes
    assert any("timestep weighting off" in note for note in notes)
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)})
    ctx.calibration = _with_timesteps(ctx.calibration)
    notes = LearnedScales(_config(iterations=3)).call(ctx).notes
    assert any("adaptive' over 3 timesteps" in note for note in notes)


def test_samples_keep_their_timestep_and_rows_map_back():
    model = fold_graphs.outlier_model()
    ctx = context(model, {"x": (4, 8, 16)}, count=6)
    ctx.calibration = _with_timesteps(ctx.calibration)
    chosen = select_samples(ctx.calibration, 3)  # fewer rows than batches: one row from spread batches
    assert [b.batch_size for b in chosen] == [1, 1, 1]
    assert list(sample_timesteps(chosen)) == [900, 100, 100]  # batches 0, 2 and 5
    chosen = select_samples(ctx.calibration, 12)
    assert sum(b.batch_size for b in chosen) == 12 and len(sample_timesteps(chosen)) == 12
    values = collect_inputs(ctx, chosen, ["ln.out"])
    x, rows = values["ln.out"]
    assert x.shape == (12, 8, 16) and list(rows) == list(range(12))


def test_missing_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(QCompileError, match="needs PyTorch"):
        import_torch("learned_scales")


@pytest.mark.parametrize("layout, shape, block", [("conv", (6, 5, 3, 3), None), ("columns", (40, 7), None),
                                                  ("blocks", (40, 7), 16)])
def test_training_weight_quantizer_matches_the_clip_search_lowering(layout, shape, block):
    """LES trains on the weights quantize_weights(clip_search) will deploy: same ratios, same grid."""
    from qcompiler.les_training import fake_quant_weight
    from qcompiler.weight_quant import DEFAULT_CLIP_RATIOS, quantize_weight_clipped
    from qcompiler.quant import QuantSpec, element_params

    rng = np.random.default_rng(3)
    weight = rng.standard_t(3, size=shape).astype(np.float32)  # heavy tails: the search clips some scales
    spec = (QuantSpec(bits=4, symmetric=True, granularity="block", axis=0, block_size=block) if block
            else QuantSpec(bits=4, symmetric=True, granularity="axis", axis=0 if layout == "conv" else 1))
    q, scale, zero_point = quantize_weight_clipped(weight, spec, DEFAULT_CLIP_RATIOS)
    s, _ = element_params(weight, spec, scale, zero_point)
    reference = q.astype(np.float32) * s
    trained = fake_quant_weight(torch, torch.from_numpy(weight), 4, layout == "conv", block, DEFAULT_CLIP_RATIOS)
    np.testing.assert_allclose(trained.numpy(), reference, rtol=1e-5, atol=1e-6)
    minmax = fake_quant_weight(torch, torch.from_numpy(weight), 4, layout == "conv", block)
    assert not np.allclose(minmax.numpy(), reference)  # the search chose r < 1 somewhere


def test_relative_loss_stays_exact_and_guarded():
    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)}, wbits=4)
    record = _run(ctx, _config(relative_loss=True, guard_clip_ratios=(1.0, 0.9, 0.8), iterations=30, lr=0.05))
    assert record.verify["max_relative_error"] <= EXACT_RTOL
    note = next(note for note in record.notes if "median ×" in note)
    assert float(note.split("median ×")[1].split(",")[0]) <= 1.0


def test_downstream_output_weights_move_the_error_to_the_channels_weighed_less():
    from qcompiler.folding import find_scale_groups
    from qcompiler.les_training import GroupProblem

    ctx = context(fold_graphs.outlier_model(), {"x": (4, 8, 16)}, wbits=4)
    group = find_scale_groups(ctx.graph, include_conv=True)[0]
    stats = ctx.statistics({group.name: group.channel_axis}, progress=False)[group.name]
    x, _ = collect_inputs(ctx, ctx.calibration, [group.name])[group.name]

    def problem(weights=None):
        return GroupProblem(torch, group, x, stats.channel_min, stats.channel_max, ctx.settings,
                            output_weights=None if weights is None else [np.asarray(weights, np.float64)])

    outputs = 16
    first = np.r_[np.ones(8), np.zeros(8)]  # the next layer reads output channels 0-7 far more than 8-15
    gamma = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 2.0, 16).astype(np.float32))
    # uniform weights (mean 1): exactly the unweighted loss
    np.testing.assert_allclose(problem(np.ones(outputs)).pool_losses(gamma), problem().pool_losses(gamma), rtol=1e-6)
    config = _config(iterations=150, lr=0.05, holdout=0.0)
    plain = learn_gamma(torch, problem(), np.ones(16), config, None)["gamma"]
    weighted = learn_gamma(torch, problem(0.1 + 1.8 * first), np.ones(16), config, None)["gamma"]
    assert not np.allclose(plain, weighted)

    def error_in(channels, gamma):
        return problem(channels).pool_losses(torch.from_numpy(gamma.astype(np.float32))).mean()

    share = {name: error_in(first, g) / (error_in(first, g) + error_in(1 - first, g))
             for name, g in (("plain", plain), ("weighted", weighted))}
    assert share["weighted"] < 0.8 * share["plain"], share  # measured 0.30 vs 0.49


def test_downstream_weighting_in_the_pass_stays_exact_and_says_where_it_applied():
    ctx = context(fold_graphs.linear_chain_model(), {"x": (4, 4, 8)}, wbits=4)
    record = _run(ctx, _config(output_weighting="downstream", iterations=10, min_gain=0.0))
    assert record.verify["max_relative_error"] <= EXACT_RTOL
    # fc1's output feeds fc2 (weighted); fc2 writes the model output (no downstream layer: unweighted)
    assert any("weighted by the next layers' channel weights in 1 of 2 groups" in note for note in record.notes)
    with pytest.raises(ValueError, match="output_weighting"):
        _config(output_weighting="sideways")
