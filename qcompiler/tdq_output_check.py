"""TDQ's model-output check: which tuned corrections to keep, judged on the denoiser's output.

``tdq`` first keeps an activation's tuned correction where it lowers that activation's own held-out
quantization error. Each such choice is local, and together they can still make the model's output
worse (measured on the zoo DiT at W8A6: 17 of 27 corrections passed, and the final images lost
0.5 dB against the untuned table at the calibrated timesteps). So the candidate sets

    C_0 = ∅ (the lookup envelope everywhere),  C_g = {activations whose own held-out gain > g}
    (gain = 1 − E_tuned/E_envelope, for each g in ``gains``)

are compared on the denoiser's output over the held-out trajectories, every activation fake-quantized
at once with its table at t (weights as the graph has them at this point), by the error that
reaches the final image under deterministic DDIM:

    D(C) = Σ_t w_t ‖ε_t − ε̂_t(C)‖² / Σ_t w_t ‖ε_t‖²,   w_t = (σ_t − σ_t′)²,  σ = sqrt((1 − ᾱ)/ᾱ)

(ε_t: the same graph with float activations; guided, ε_u + g·(ε_c − ε_u), where the batch holds
[unconditional; conditional] halves; t′ the next lower calibrated timestep; ``image_weights``).
Why weighted: the zoo's cosine schedule multiplies an ε error at t = 961 by ~10³ more than one at
t = 1 on its way to the image, and an unweighted Σ_t relative error (the first version of this
check) ranked the DiT W8A6 corrections the other way round from the images. Without a scheduler
configuration (no ᾱ) the unweighted Σ_t ‖ε_t − ε̂_t‖²/‖ε_t‖² is used. The set with the lowest D is
kept (ties go to the smaller set). One forward pass over the held-out rows per distinct candidate,
plus one for ε.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.grids import GroupPlan
from qcompiler.quant import QuantSpec
from qcompiler.skeleton import Skeleton, insert_after_producers

log = logging.getLogger(__name__)

PREFIX = "qcompile_tdq_check"


def fake_quant_skeleton(skel: Skeleton, tensors: Sequence[str], spec: QuantSpec) -> Skeleton:
    """``skel`` with every tensor in ``tensors`` replaced, for all its readers, by
    X̂ = (clip(round(X/s) + z, q_min, q_max) − z)·s, where s and z are new graph inputs
    ``{PREFIX}/s{i}`` and ``{PREFIX}/z{i}`` (float, fed broadcastable to X). Round is half to even,
    as QuantizeLinear's. The weights stay the skeleton's (by reference)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(skel.proto)
    graph = proto.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(spec.qmin, np.float32), f"{PREFIX}/qmin"),
                              numpy_helper.from_array(np.array(spec.qmax, np.float32), f"{PREFIX}/qmax")])
    replaced = {}
    nodes = []
    for i, name in enumerate(tensors):
        s, z, p = f"{PREFIX}/s{i}", f"{PREFIX}/z{i}", f"{PREFIX}/{i}"
        graph.input.extend([helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None),
                            helper.make_tensor_value_info(z, onnx.TensorProto.FLOAT, None)])
        nodes += [helper.make_node("Div", [name, s], [f"{p}/div"]),
                  helper.make_node("Round", [f"{p}/div"], [f"{p}/round"]),
                  helper.make_node("Add", [f"{p}/round", z], [f"{p}/codes"]),
                  helper.make_node("Clip", [f"{p}/codes", f"{PREFIX}/qmin", f"{PREFIX}/qmax"], [f"{p}/clip"]),
                  helper.make_node("Sub", [f"{p}/clip", z], [f"{p}/centred"]),
                  helper.make_node("Mul", [f"{p}/centred", s], [f"{p}/out"])]
        replaced[name] = f"{p}/out"
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in replaced:
                node.input[j] = replaced[name]
    insert_after_producers(graph, nodes)
    return Skeleton(proto, skel.arrays)


def broadcast_shape(plan: GroupPlan, rank: int) -> list[int]:
    """The shape that puts a plan's per-index vector on its grouped axis (as ``tdq.grouped_layout``)."""
    axis = plan.channel_axis % rank if plan.axis == "channel" else 1
    shape = [1] * rank
    shape[axis] = plan.labels.size
    return shape


def candidate_sets(gains: dict[str, float], thresholds: Sequence[float]) -> list[frozenset[str]]:
    """∅ and {name: gain > g} for each threshold, distinct, smallest first."""
    sets = {frozenset()} | {frozenset(n for n, gain in gains.items() if gain > g) for g in thresholds}
    return sorted(sets, key=lambda c: (len(c), sorted(c)))


def output_errors(skel: Skeleton, plans: dict[str, GroupPlan], ranks: dict[str, int],
                  grids: dict[str, list[tuple[np.ndarray, np.ndarray]]], timesteps: np.ndarray,
                  heldout: Sequence, candidates: Sequence[frozenset[str]], spec: QuantSpec,
                  timestep_of, guide=None, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(E, N): E[c, t] = Σ ‖g(Y) − g(Ŷ(C_c))‖² and N[t] = Σ ‖g(Y)‖² over the held-out batches at each
    calibrated t, g = ``guide(batch, output)`` (identity when None; the sampler's guided ε for
    [unconditional; conditional] batches). ``grids[name]`` = [envelope (S, Z), tuned (S, Z)], each
    (len(timesteps), K); ``timestep_of(batch)`` = the batch's one timestep."""
    from qcompiler.calibration.capture import run_batch
    from qcompiler.runtimes.ort import make_session

    guide = guide or (lambda batch, value: value)
    names = [n for n in plans if n in ranks]
    outputs = [value.name for value in skel.proto.graph.output]
    reference = make_session(skel, threads=threads, lean=True)
    quantized = make_session(fake_quant_skeleton(skel, names, spec), threads=threads, lean=True)
    inputs = {value.name for value in quantized.get_inputs()}
    error = np.zeros((len(candidates), timesteps.size))
    norm = np.zeros(timesteps.size)
    for batch in heldout:
        t = float(timestep_of(batch))
        i = int(np.searchsorted(timesteps, t))
        if i >= timesteps.size or timesteps[i] != t:
            continue
        expected = [guide(batch, y) for y in run_batch(reference, outputs, batch)]
        norm[i] += sum(float(np.square(y, dtype=np.float64).sum()) for y in expected)
        for c, chosen in enumerate(candidates):
            feeds = {k: v for k, v in batch.feeds.items() if k in inputs}
            for j, name in enumerate(names):
                plan = plans[name]
                scale, zero_point = grids[name][int(name in chosen)]
                shape = broadcast_shape(plan, ranks[name])
                feeds[f"{PREFIX}/s{j}"] = scale[i][plan.labels].astype(np.float32).reshape(shape)
                feeds[f"{PREFIX}/z{j}"] = zero_point[i][plan.labels].astype(np.float32).reshape(shape)
            got = quantized.run(outputs, feeds)
            error[c, i] += sum(float(np.square(guide(batch, g) - y, dtype=np.float64).sum())
                               for g, y in zip(got, expected))
    return error, norm


def image_weights(timesteps: np.ndarray, alphas_cumprod: np.ndarray, final_alpha_cumprod: float) -> np.ndarray:
    """w_t = (σ_t − σ_t′)², σ = sqrt((1 − ᾱ)/ᾱ), t′ the next lower calibrated timestep (the sampler's
    final ᾱ after the lowest): deterministic DDIM is Euler's method on x̄ = x/sqrt(ᾱ) in σ,
    x̄_t′ = x̄_t + (σ_t′ − σ_t)·ε, so an error Δε at t moves the final x̄ (the image, ᾱ_final ≈ 1)
    by (σ_t − σ_t′)·Δε. Scaled to sum to 1."""
    alphas = np.asarray(alphas_cumprod, np.float64)
    sigma = lambda a: np.sqrt((1.0 - a) / a)  # noqa: E731
    steps = np.clip(np.rint(timesteps).astype(np.int64), 0, alphas.size - 1)
    here = sigma(alphas[steps])
    below = np.concatenate([[sigma(float(final_alpha_cumprod))], here[:-1]])
    weights = np.square(here - below)
    return weights / max(weights.sum(), 1e-300)


def output_score(error: np.ndarray, norm: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """D per candidate: Σ_t w_t E[c, t] / Σ_t w_t N[t] with image weights, else Σ_t E[c, t]/N[t]."""
    seen = norm > 0
    if weights is None:
        return (error[:, seen] / norm[seen]).sum(axis=1)
    return (error[:, seen] * weights[seen]).sum(axis=1) / max(float((norm[seen] * weights[seen]).sum()), 1e-300)
