"""tdq: an MLP per activation from the timestep to its range, tabled at every t and gathered at run time."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.lowering.timestep_integer import INTEGER
from qcompiler.passes import DgqGroups, InsertActivationQDQ, QuantizeWeights, Tdq
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.passes.tdq import TdqConfig
from qcompiler.quant import (
    QuantSpec,
    dequantize,
    fake_quantize,
    quantize,
    scale_zero_point,
)
from qcompiler.runtimes.ort import make_session
from qcompiler.targets.ort import OrtTarget
from qcompiler.tdq_training import (
    TimestepSamples,
    TrainSettings,
    lookup_envelope,
    timestep_embedding,
    train_mlp,
)
from tests import graphs
from tests.lowering.test_timestep_ranges import K, timestep_model
from tests.passes.helpers import run_model

T = 1000
CALIBRATED = (1.0, 201.0, 401.0, 601.0, 801.0, 961.0)
SPEC = QuantSpec(bits=8, symmetric=False)
ROWS = 16
FAST = TdqConfig(tune_iterations=50, num_train_timesteps=T)


def batches(timesteps=CALIBRATED, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(timesteps):
        x = rng.standard_normal((ROWS, 4, K)).astype(np.float32)
        x[..., 5] *= 6.0
        out.append(CalibrationBatch({"x": x, "timestep": np.full(ROWS, t, np.float32)},
                                    {"__timestep__": np.full(ROWS, int(t))}, f"t{i}"))
    return out


def compiled(config=FAST, groups: int | None = None, tdq: bool = True):
    ctx = CompileContext(timestep_model(), QuantSettings(), batches())
    QuantizeWeights().call(ctx)
    if groups is not None:
        DgqGroups(DgqGroupsConfig(groups=groups)).call(ctx)
    if tdq:
        Tdq(config).call(ctx)
    InsertActivationQDQ().call(ctx)
    # The integer form (the default "auto" keeps this toy's K = 16 Linear simulated: too narrow to pay).
    OrtTarget(OrtTarget.Config(timestep_groups="integer")).lower(ctx)
    return ctx


def reference(feeds, scale, zero_point):
    """h = x·(1 + t/100) quantized with (scale, zero_point) per channel, times Ŵ (int8 per channel), + b."""
    initial = {i.name: numpy_helper.to_array(i) for i in timestep_model().graph.initializer}
    h = feeds["x"] * (1 + feeds["timestep"][:, None, None] / 100).astype(np.float32)
    h_hat = dequantize(quantize(h, scale, zero_point, SPEC, axis=-1), scale, zero_point, axis=-1)
    w_hat = fake_quantize(initial["w"], QuantSpec(bits=8, symmetric=True, granularity="axis", axis=1))
    return h, h_hat, h_hat @ w_hat + initial["b"]


def test_table_equals_the_mlp_evaluated_at_each_timestep():
    rng = np.random.default_rng(0)
    t = np.array(CALIBRATED)
    gain = 1 + t / 100
    values = rng.standard_normal((t.size, 32, 3)) * gain[:, None, None]
    samples = TimestepSamples(t, values.min(axis=1), values.max(axis=1), values, np.array([0, 0, 1]))
    mlp = train_mlp(samples, SPEC, T, TrainSettings(tune_iterations=20))
    assert np.abs(mlp.w2).max() > 0  # tuned: the table is not the envelope alone
    scales, zero_points = mlp.table(SPEC)
    assert scales.shape == zero_points.shape == (T, 2)
    # An independent forward in torch, one timestep at a time, of the same weights.
    for step in (0, 1, 37, 500, 961, 999):
        emb = torch.from_numpy(timestep_embedding(np.array([step]), mlp.embedding_dim, T)).double()
        h = torch.nn.functional.silu(emb @ torch.from_numpy(mlp.w1).double().T + torch.from_numpy(mlp.b1).double())
        out = (h @ torch.from_numpy(mlp.w2).double().T + torch.from_numpy(mlp.b2).double()).numpy()[0]
        low, high = mlp.base_low[step] * np.exp(out[:2]), mlp.base_high[step] * np.exp(out[2:])
        scale, zero_point = scale_zero_point(low, high, SPEC)
        np.testing.assert_allclose(scales[step], scale, rtol=1e-6)
        np.testing.assert_array_equal(zero_points[step], zero_point)


@pytest.fixture(scope="module")
def tdq_ctx():
    return compiled()


def test_training_is_deterministic(tdq_ctx):
    np.testing.assert_array_equal(tdq_ctx.group_plans["h"].timestep_scales,
                                  compiled().group_plans["h"].timestep_scales)


def test_lowered_graph_gathers_row_t_of_the_table(tdq_ctx):
    plan = tdq_ctx.group_plans["h"]
    assert plan.timesteps.size == T and plan.timestep_method == "tdq"
    # Integer GEMMs rescaled by the gathered row (the simulated form: tests/lowering).
    assert {r.lowering for r in tdq_ctx.records if r.pass_name == "ort"} == {f"{INTEGER} (TDQ)"}
    session = make_session(tdq_ctx.model())
    for t in (1.0, 37.0, 240.0, 961.0):  # calibrated or not: row t of the table
        feeds = batches((t,), seed=3)[0].feeds
        row = int(t)
        scale, zero_point = plan.timestep_scales[row][plan.labels], plan.timestep_zero_points[row][plan.labels]
        h, h_hat, expected = reference(feeds, scale, zero_point.astype(np.int32))
        got = session.run(None, feeds)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        low, high = -scale[0] * zero_point[0], scale[0] * (255 - zero_point[0])
        inside = (h >= low) & (h <= high)
        assert np.all(np.abs(h - h_hat)[inside] <= scale[0] / 2 + 1e-6)  # the bound inside the range at t


def output_error(ctx, t: float) -> float:
    feeds = batches((t,), seed=5)[0].feeds
    return float(np.abs(run_model(ctx.model(), feeds) - run_model(timestep_model(), feeds)).mean())




def test_tdq_beats_static_ranges_and_the_nearest_lookup_between_calibrated_timesteps(tdq_ctx):
    """h's range grows as 1 + t/100. One static range is ~10× too wide at t = 1. The lookup takes the
    nearest calibrated range: at t = 300, 500, 700, 900 the nearest (201/401/601/801, 1 below by ties
    or distance) is narrower than the truth and clips; the MLP interpolates. (Where the nearest range
    is the wider one, e.g. t = 150 → 201, the lookup can win: it clips nothing.)"""
    static, tdq = compiled(tdq=False), tdq_ctx
    lookup = CompileContext(timestep_model(), QuantSettings(), batches())
    QuantizeWeights().call(lookup)
    DgqGroups(DgqGroupsConfig(groups=1, per_timestep=True)).call(lookup)
    OrtTarget().lower(lookup)
    assert output_error(tdq, 1.0) < output_error(static, 1.0) / 3
    assert output_error(tdq, 1.0) < 1.2 * output_error(lookup, 1.0)  # calibrated: the fit reproduces the lookup
    for t in (300.0, 500.0, 700.0, 900.0):  # not calibrated
        assert output_error(tdq, t) < output_error(lookup, t)


def test_lookup_envelope_is_the_calibrated_range_there_and_covers_both_neighbours_between():
    t = np.array([10.0, 20.0, 40.0])
    low, high = np.array([[-1.0], [-3.0], [-2.0]]), np.array([[5.0], [1.0], [4.0]])
    env_low, env_high = lookup_envelope(t, low, high, 50)
    assert env_low.shape == (50, 1)
    for j, step in enumerate((10, 20, 40)):
        assert env_low[step, 0] == low[j, 0] and env_high[step, 0] == high[j, 0]
    assert (env_low[15, 0], env_high[15, 0]) == (-3.0, 5.0)
    assert (env_low[30, 0], env_high[30, 0]) == (-3.0, 4.0)
    assert (env_low[0, 0], env_high[0, 0], env_low[49, 0], env_high[49, 0]) == (-1.0, 5.0, -2.0, 4.0)


def _lookup_plan():
    """h's plan from DGQ's per-timestep lookup (one group) on the same model and batches."""
    lookup = CompileContext(timestep_model(), QuantSettings(), batches())
    QuantizeWeights().call(lookup)
    DgqGroups(DgqGroupsConfig(groups=1, per_timestep=True)).call(lookup)
    return lookup.group_plans["h"]

def test_untuned_table_reproduces_the_per_timestep_lookup_at_calibrated_timesteps():
    ctx = compiled(TdqConfig(tune_iterations=0, num_train_timesteps=T))
    ours, theirs = ctx.group_plans["h"], _lookup_plan()
    for i, t in enumerate(CALIBRATED):
        np.testing.assert_allclose(ours.timestep_scales[int(t)], theirs.timestep_scales[i], rtol=1e-6)
        np.testing.assert_array_equal(ours.timestep_zero_points[int(t)], theirs.timestep_zero_points[i])


def test_tuned_table_is_the_lookup_at_calibrated_timesteps_by_default(tdq_ctx):
    """calibrated_rows = "lookup": whatever correction is kept acts between the calibrated timesteps."""
    ours, theirs = tdq_ctx.group_plans["h"], _lookup_plan()
    for i, t in enumerate(CALIBRATED):
        np.testing.assert_allclose(ours.timestep_scales[int(t)], theirs.timestep_scales[i], rtol=1e-6)
    checked = compiled(TdqConfig(tune_iterations=50, num_train_timesteps=T, calibrated_rows="check")).group_plans["h"]
    assert checked.timestep_scales.shape == ours.timestep_scales.shape


def _narrow_every_trained_range(monkeypatch) -> None:
    """Make tdq's training return MLPs whose correction narrows every range to a third (log 1/3)."""
    import qcompiler.passes.tdq as tdq_pass

    trained = tdq_pass.train_mlps

    def narrowing(*args, **kwargs):
        mlps = trained(*args, **kwargs)
        for mlp in mlps:
            mlp.b2 = np.full_like(mlp.b2, -np.log(3.0))
        return mlps

    monkeypatch.setattr(tdq_pass, "train_mlps", narrowing)

def test_a_tuned_correction_that_raises_held_out_error_is_dropped(monkeypatch):
    """A tuning that narrows every range to a third clips the held-out rows: the check resets it."""
    untuned = compiled(TdqConfig(tune_iterations=0, num_train_timesteps=T)).group_plans["h"]
    _narrow_every_trained_range(monkeypatch)
    plan = compiled().group_plans["h"]
    np.testing.assert_allclose(plan.timestep_scales, untuned.timestep_scales, rtol=1e-6)


def test_zero_padding_of_rows_and_indices_adds_no_quantization_error():
    """Activations trained together are padded to the most rows and indices; X = 0 is exact on every grid."""
    from qcompiler.tdq_training import _padded, fake_quant_error

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 5, 4)).astype(np.float32), rng.standard_normal((3, 8, 6)).astype(np.float32)
    low, high = torch.full((2, 3, 1), -1.5), torch.full((2, 3, 1), 2.0)
    padded = fake_quant_error(torch, torch.from_numpy(_padded([a, b])), low, high,
                              torch.zeros((2, 6), dtype=torch.int64), SPEC)
    alone = fake_quant_error(torch, torch.from_numpy(a[None]), low[:1], high[:1], torch.zeros((1, 4), dtype=torch.int64), SPEC)
    np.testing.assert_allclose(padded[0].numpy(), alone[0].numpy(), rtol=1e-6)


def test_dgq_groups_get_a_table_per_group():
    ctx = compiled(groups=4)
    plan = ctx.group_plans["h"]
    assert plan.timestep_scales.shape == (T, plan.groups) and plan.groups > 1


def test_model_without_the_timestep_input_is_a_clear_error():
    x = np.random.default_rng(0).standard_normal((2, 4, K)).astype(np.float32)
    ctx = CompileContext(graphs.linear_model(k=K, n=8), QuantSettings(), [CalibrationBatch({"x": x}, {}, "b0")])
    with pytest.raises(PassError, match="no input 'timestep'"):
        Tdq().requires(ctx)


def test_fake_quant_skeleton_matches_quantize_dequantize_per_channel():
    """The output check's graph: X̂ with s, z fed per channel equals quant.fake_quantize's, before the GEMM."""
    from qcompiler.graph import to_graph, to_skeleton
    from qcompiler.tdq_output_check import PREFIX, fake_quant_skeleton

    model = timestep_model()
    skel = fake_quant_skeleton(to_skeleton(to_graph(model), model), ["h"], SPEC)
    feeds = batches((240.0,), seed=2)[0].feeds
    h = feeds["x"] * (1 + feeds["timestep"][:, None, None] / 100).astype(np.float32)
    low, high = h.reshape(-1, K).min(axis=0) * 0.7, h.reshape(-1, K).max(axis=0) * 0.7  # some values clip
    scale, zero_point = scale_zero_point(low, high, SPEC)
    got = make_session(skel).run(None, {**feeds, f"{PREFIX}/s0": scale.astype(np.float32).reshape(1, 1, K),
                                        f"{PREFIX}/z0": zero_point.astype(np.float32).reshape(1, 1, K)})[0]
    initial = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    h_hat = dequantize(quantize(h, scale, zero_point.astype(np.int32), SPEC, axis=-1), scale,
                       zero_point.astype(np.int32), axis=-1)
    expected = h_hat @ initial["w"] + initial["b"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_candidate_sets_are_the_envelope_and_each_gain_threshold():
    from qcompiler.tdq_output_check import candidate_sets

    sets = candidate_sets({"a": 0.5, "b": 0.05, "c": -0.2}, (0.0, 0.1, 0.3))
    assert sets == [frozenset(), frozenset({"a"}), frozenset({"a", "b"})]


def test_output_check_drops_corrections_that_raise_the_output_error(monkeypatch):
    """A correction narrowing h's range to a third clips it. With the gain threshold at −∞ the
    per-activation check lets it into a candidate set; the output check measures it worse than the
    envelope and keeps the envelope."""
    untuned = compiled(TdqConfig(tune_iterations=0, num_train_timesteps=T)).group_plans["h"]
    _narrow_every_trained_range(monkeypatch)
    ctx = CompileContext(timestep_model(), QuantSettings(), batches())
    QuantizeWeights().call(ctx)
    result = Tdq(TdqConfig(tune_iterations=5, num_train_timesteps=T, output_check=True, output_check_gains=(-1e9,))).call(ctx)
    np.testing.assert_allclose(ctx.group_plans["h"].timestep_scales, untuned.timestep_scales, rtol=1e-6)
    check = next(n for n in result.notes if n.startswith("output check"))
    found = re.search(r"through the midpoints: envelope ([-+.\de]+), 1 tuned ([-+.\de]+) → envelope", check)
    assert found and float(found.group(2)) > 2 * float(found.group(1))


def test_output_check_prefers_the_candidate_with_the_lower_output_error():
    """output_errors on the toy: the rows' own per-timestep ranges (as the tuned grid) against ranges
    three times too wide (as the envelope): coarser steps, so a larger error at the output."""
    from qcompiler.graph import to_graph, to_skeleton
    from qcompiler.tdq_output_check import candidate_sets, output_errors, output_score

    model, data = timestep_model(), batches()
    low, high = [], []
    for b in data:
        h = (b.feeds["x"] * (1 + b.feeds["timestep"][:, None, None] / 100)).reshape(-1, K)
        low.append(np.minimum(h.min(axis=0), 0))
        high.append(np.maximum(h.max(axis=0), 0))
    low, high = np.array(low), np.array(high)
    plan = replace(compiled(TdqConfig(tune_iterations=0, num_train_timesteps=T)).group_plans["h"], labels=np.arange(K))
    candidates = candidate_sets({"h": 0.5}, (0.0,))
    error, norm = output_errors(to_skeleton(to_graph(model), model), {"h": plan}, {"h": 3},
                           {"h": [scale_zero_point(3 * low, 3 * high, SPEC), scale_zero_point(low, high, SPEC)]},
                           np.array(CALIBRATED), data, candidates, SPEC, lambda b: b.feeds["timestep"][0])
    assert candidates == [frozenset(), frozenset({"h"})] and error.shape == (2, len(CALIBRATED))
    scores = output_score(error, norm)
    assert scores[1] < scores[0] / 4
    np.testing.assert_allclose(scores, (error / norm).sum(axis=1))


def denoiser_model():
    """eps = (x·(1 + t/100))·W, W (K, K) small: the output has the latent's shape, as a denoiser's."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(4).standard_normal((K, K)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Div", ["timestep", "hundred"], ["t_scaled"]),
             helper.make_node("Add", ["t_scaled", "one"], ["gain"]),
             helper.make_node("Unsqueeze", ["gain", "axes"], ["gain3"]),
             helper.make_node("Mul", ["x", "gain3"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["eps"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, K]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])]
    inits = [graphs.init("hundred", np.array(100.0, np.float32)), graphs.init("one", np.array(1.0, np.float32)),
             graphs.init("axes", np.array([1, 2], np.int64)), graphs.init("w", w)]
    return graphs.make_model(nodes, inputs, [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", 4, K])],
                             inits), w


def test_trajectory_check_is_ddim_with_the_candidate_tables():
    """trajectory_errors against numpy: guided DDIM from the first held-out input through the
    calibrated timesteps, h fake-quantized with the candidate's (S, Z) at each t, vs float h."""
    from qcompiler.graph import to_graph, to_skeleton
    from qcompiler.tdq_output_check import trajectory_errors

    model, w = denoiser_model()
    rng = np.random.default_rng(6)
    x_start = rng.standard_normal((2, 4, K)).astype(np.float32)
    parts = [CalibrationBatch({"x": np.concatenate([x_start, x_start]), "timestep": np.full(4, t, np.float32)},
                              {"__label__": np.array([-1, -1, 3, 5]), "__timestep__": np.full(4, int(t))}, f"t{t}")
             for t in CALIBRATED]
    t = np.array(CALIBRATED)
    alphas = np.cos(np.linspace(0, 1, T) * np.pi / 2 * 0.98) ** 2
    low = -np.linspace(1.0, 3.0, t.size)[:, None] * np.ones((1, K))
    grids = {"h": [scale_zero_point(3 * low, -3 * low, SPEC), scale_zero_point(low, -low, SPEC)]}
    plan = replace(compiled(TdqConfig(tune_iterations=0, num_train_timesteps=T)).group_plans["h"], labels=np.arange(K))
    descending = {"h": [tuple(a[::-1] for a in g) for g in grids["h"]]}  # row k for schedule[k]
    errors = trajectory_errors(to_skeleton(to_graph(model), model), {"h": plan}, {"h": 3}, descending, t[::-1],
                               [parts[-1]], [frozenset(), frozenset({"h"})], SPEC, alphas, 0.999, 4.0, "timestep")

    def ddim(grid):
        x = x_start.astype(np.float64)
        for k, step in enumerate(CALIBRATED[::-1]):
            h = np.concatenate([x, x]).astype(np.float32) * np.float32(1 + step / 100)
            if grid is not None:
                i = CALIBRATED.index(step)
                s, z = grid[0][i], grid[1][i].astype(np.int32)
                h = dequantize(quantize(h, s, z, SPEC, axis=-1), s, z, axis=-1)
            eps = (h @ w).astype(np.float64)
            eps = eps[:2] + 4.0 * (eps[2:] - eps[:2])
            a_t = alphas[int(step)]
            a_prev = alphas[int(CALIBRATED[::-1][k + 1])] if k + 1 < len(CALIBRATED) else 0.999
            x = np.sqrt(a_prev) * (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t) + np.sqrt(1 - a_prev) * eps
        return np.clip(x, -1, 1)

    reference = ddim(None)
    expected = [np.square(ddim(g) - reference).sum() / np.square(reference).sum() for g in grids["h"]]
    np.testing.assert_allclose(errors, expected, rtol=1e-3)
    assert errors[0] != errors[1]  # the candidates' tables differ, and so do their images


def test_corrected_rows_take_the_correction_and_the_others_are_the_envelope():
    """The output check may keep a correction between the calibrated timesteps only: those rows are
    the MLP's, the calibrated rows the envelope (the lookup's range there)."""
    rng = np.random.default_rng(0)
    t = np.array(CALIBRATED)
    values = rng.standard_normal((t.size, 32, 3)) * (1 + t / 100)[:, None, None]
    samples = TimestepSamples(t, values.min(axis=1), values.max(axis=1), values, np.array([0, 0, 1]))
    mlp = train_mlp(samples, SPEC, T, TrainSettings(tune_iterations=20))
    full = mlp.ranges(np.arange(T))
    calibrated = np.zeros(T, bool)
    calibrated[t.astype(int)] = True
    mlp.corrected = ~calibrated
    low, high = mlp.ranges(np.arange(T))
    np.testing.assert_array_equal(low[calibrated], mlp.base_low[calibrated])
    np.testing.assert_array_equal(high[calibrated], mlp.base_high[calibrated])
    np.testing.assert_array_equal(low[~calibrated], full[0][~calibrated])
    assert not np.array_equal(full[0][calibrated], mlp.base_low[calibrated])  # the correction is not 0 there
