"""ptqd: k_t and the residual variance from float vs quantized outputs; ε̂/(1 + k_t) folded; metadata to the sampler."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.diffusion import ptqd as sampler_ptqd
from qcompiler.diffusion.sampler import SamplerConfig, _ptqd_ratio
from qcompiler.errors import PassError
from qcompiler.passes import Ptqd
from qcompiler.passes.ptqd import METADATA_KEY, PtqdConfig, TimestepSums, apply_ptqd, correction_table
from qcompiler.runtimes.ort import make_session
from tests import graphs

T = 1000
TIMESTEPS = (1, 481, 961)
C = 6


def denoiser(gain: float = 1.0, noise: float = 0.0, seed: int = 0):
    """y = (x·W)·gain + noise·x·V: a denoiser-shaped toy (sample, timestep) whose 'quantized' twin is a
    rescaled copy (correlated error, k = gain − 1) plus an independent term (the residual)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((C, C)).astype(np.float32)
    v = rng.standard_normal((C, C)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["sample", "w"], ["xw"]), helper.make_node("Mul", ["xw", "gain"], ["main"]),
             helper.make_node("MatMul", ["sample", "v"], ["xv"]), helper.make_node("Mul", ["xv", "noise"], ["extra"]),
             helper.make_node("Add", ["main", "extra"], ["sum"]),
             helper.make_node("Cast", ["timestep"], ["t_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["t_float", "zero"], ["t_zero"]),
             helper.make_node("Unsqueeze", ["t_zero", "axes"], ["t_bias"]),
             helper.make_node("Add", ["sum", "t_bias"], ["out_sample"])]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 4, C]),
              helper.make_tensor_value_info("timestep", TensorProto.INT64, ["B"])]
    output = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["B", 4, C])
    inits = [graphs.init("w", w), graphs.init("v", v), graphs.init("gain", np.array(gain, np.float32)),
             graphs.init("noise", np.array(noise, np.float32)), graphs.init("zero", np.array(0.0, np.float32)),
             graphs.init("axes", np.array([1, 2], np.int64))]
    return graphs.make_model(nodes, inputs, [output], inits)


def batches(rows: int = 4, seed: int = 0):
    """[unconditional; conditional] halves as ``qcompile collect`` writes them (``__label__`` −1 first)."""
    rng = np.random.default_rng(seed)
    return [CalibrationBatch({"sample": rng.standard_normal((2 * rows, 4, C)).astype(np.float32),
                              "timestep": np.full(2 * rows, t, np.int64)},
                             {"__timestep__": np.full(2 * rows, t), "__label__": np.r_[[-1] * rows, range(rows)]},
                             f"t{t}") for t in TIMESTEPS]


def corrected(tmp_path, gain, noise):
    float_path = tmp_path / "float.onnx"
    import onnx

    onnx.save(denoiser(), float_path)
    ctx = CompileContext(denoiser(gain, noise), QuantSettings(), batches(), source=str(float_path))
    Ptqd(PtqdConfig(num_train_timesteps=T)).call(ctx)
    return ctx, json.loads(ctx.metadata[METADATA_KEY])


def test_estimates_follow_their_closed_form():
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((8, 50))
    delta = 0.2 * eps + 0.05 * rng.standard_normal((8, 50))
    sums = TimestepSums()
    sums.add(7.0, eps, delta, paired=True)
    got = sums.estimates()
    k = float((delta * eps).sum() / (eps * eps).sum())
    residual = delta - k * eps
    assert got["k"] == [pytest.approx(k, rel=1e-12)]
    assert got["residual_variance"] == [pytest.approx((residual ** 2).mean() / (1 + k) ** 2, rel=1e-10)]
    u, c = residual[:4].ravel(), residual[4:].ravel()
    assert got["residual_covariance"] == [pytest.approx((u * c).mean() / (1 + k) ** 2, rel=1e-10)]
    assert got["residual_variance_cond"] == [pytest.approx((c * c).mean() / (1 + k) ** 2, rel=1e-10)]


def test_a_rescaled_output_is_corrected_exactly(tmp_path):
    """ε̂ = 1.25·ε: k_t = 0.25 at every t, no residual, and ε̂/(1 + k) is the float output again."""
    ctx, estimates = corrected(tmp_path, gain=1.25, noise=0.0)
    np.testing.assert_allclose(estimates["k"], 0.25, rtol=1e-6)
    assert max(estimates["residual_variance"]) < 1e-10
    feeds = batches(seed=4)[1].feeds
    got = make_session(ctx.model()).run(None, feeds)[0]
    want = make_session(denoiser()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_output_correction_is_exact_to_its_formula_at_every_timestep(tmp_path):
    ctx, estimates = corrected(tmp_path, gain=1.1, noise=0.3)
    assert ctx.graph.outputs[0].name == "out_sample"
    table = correction_table(estimates["timesteps"], estimates["k"], T)
    corrected_session, quantized_session = make_session(ctx.model()), make_session(denoiser(1.1, 0.3))
    for t in (0, 1, 300, 481, 700, 999):  # calibrated, between, and beyond the calibrated ones
        k_t = np.interp(t, estimates["timesteps"], estimates["k"])
        assert table[t] == pytest.approx(1 / (1 + k_t), rel=1e-6)
        feeds = {**batches(seed=5)[0].feeds}
        feeds["timestep"] = np.full(len(feeds["timestep"]), t, np.int64)
        quantized = quantized_session.run(None, feeds)[0]
        np.testing.assert_allclose(corrected_session.run(None, feeds)[0], quantized * table[t], rtol=1e-6, atol=1e-7)


def test_metadata_round_trips_into_the_sampler(tmp_path):
    import onnx

    onnx.save(denoiser(), tmp_path / "float.onnx")
    onnx.save(denoiser(1.1, 0.3), tmp_path / "quant.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, batch in enumerate(batches()):
        np.savez(folder / f"b{i:03d}.npz", **batch.feeds, **batch.metadata)
    estimates = apply_ptqd(tmp_path / "float.onnx", tmp_path / "quant.onnx", folder, tmp_path / "ptqd.onnx",
                           PtqdConfig(num_train_timesteps=T))
    read = sampler_ptqd.read_metadata(make_session(tmp_path / "ptqd.onnx"))
    assert read == json.loads(json.dumps(estimates)) and read["timesteps"] == list(map(float, TIMESTEPS))
    # The same dict in a scheduler config reaches the sampler's noise scale: σ′²/σ² = 1 − a_t²·v_t/σ_t².
    config = SamplerConfig(steps=25, eta=1.0, scheduler_config=sampler_ptqd.scheduler_config_with(
        {"num_train_timesteps": T, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}, read))
    scheduler = config.scheduler()
    t = 481
    w = config.guidance_scale
    v = ((1 - w) ** 2 * read["residual_variance_uncond"][1] + w ** 2 * read["residual_variance_cond"][1]
         + 2 * w * (1 - w) * read["residual_covariance"][1])
    prev = t - T // 25
    sigma2 = float(scheduler._get_variance(t, prev))  # diffusers' own σ_t² at η = 1
    ratio, sigma, a_t = sampler_ptqd.noise_ratio(scheduler, t, 1.0, v)
    assert sigma ** 2 == pytest.approx(sigma2, rel=1e-5)
    assert ratio == pytest.approx(np.sqrt(max(1 - a_t ** 2 * v / sigma2, 0.0)), rel=1e-9)
    assert _ptqd_ratio(None, scheduler, t, config) == pytest.approx(ratio)
    assert _ptqd_ratio(None, scheduler, t, SamplerConfig(eta=1.0, ptqd_variance=False)) == 1.0


def test_model_without_the_timestep_input_is_a_clear_error():
    ctx = CompileContext(graphs.linear_model(k=4, n=4), QuantSettings(),
                         [CalibrationBatch({"x": np.zeros((2, 4), np.float32)}, {}, "b0")])
    with pytest.raises(PassError, match="no input 'timestep'"):
        Ptqd().requires(ctx)
