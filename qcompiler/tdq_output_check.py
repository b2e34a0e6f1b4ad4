"""TDQ's output check: which tuned corrections to keep, judged on the final image.

``tdq`` first keeps an activation's tuned correction where it lowers that activation's own held-out
quantization error. Each such choice is local, and together they can still make the images worse.
So the candidate sets

    C_0 = ∅ (the lookup envelope everywhere),  C_g = {activations whose own held-out gain > g}
    (gain = 1 − E_tuned/E_envelope, for each g in ``gains``)

are compared on the held-out trajectories with every activation fake-quantized at once by its
table at t (weights as the graph has them at this point), by ``trajectory_errors``: deterministic
DDIM through the calibrated timesteps from each held-out trajectory's first input, guided where the
batches hold [unconditional; conditional] halves, and the relative error of the final x₀ against the
same graph with float activations:

    D(C) = Σ ‖x₀(C) − x₀‖² / Σ ‖x₀‖²

so errors compound along the quantized trajectory as they do in the sampler. ``tdq`` runs it
through the midpoints between the calibrated timesteps (its table there is the MLP's guess), and
through the calibrated timesteps only with ``calibrated_rows = "check"``: on the zoo DiT at W8A6 the
4 held-out trajectories ranked the tuned corrections better there, and 16 sampled images worse
(−0.58 dB). Without the model JSON's scheduler configuration (no ᾱ) or a latent input, the
single-step Σ_t ‖ε_t − ε̂_t‖²/‖ε_t‖² on the float trajectories (``output_errors``) is used. The set
with the lowest D is kept (ties go to the smaller set). Cost: (candidates + 1) × steps forward passes
of the held-out rows.
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
            feeds.update(candidate_feeds(plans, ranks, grids, chosen, i))
            got = quantized.run(outputs, feeds)
            error[c, i] += sum(float(np.square(guide(batch, g) - y, dtype=np.float64).sum())
                               for g, y in zip(got, expected))
    return error, norm


def candidate_feeds(plans: dict[str, GroupPlan], ranks: dict[str, int], grids: dict, chosen: frozenset[str],
                    i: int) -> dict[str, np.ndarray]:
    """The fake-quant graph's s and z inputs for candidate ``chosen`` at calibrated timestep index i."""
    feeds = {}
    for j, name in enumerate(n for n in plans if n in ranks):
        plan = plans[name]
        scale, zero_point = grids[name][int(name in chosen)]
        shape = broadcast_shape(plan, ranks[name])
        feeds[f"{PREFIX}/s{j}"] = scale[i][plan.labels].astype(np.float32).reshape(shape)
        feeds[f"{PREFIX}/z{j}"] = zero_point[i][plan.labels].astype(np.float32).reshape(shape)
    return feeds


def trajectory_errors(skel: Skeleton, plans: dict[str, GroupPlan], ranks: dict[str, int], grids: dict,
                      schedule: np.ndarray, starts: Sequence, candidates: Sequence[frozenset[str]],
                      spec: QuantSpec, alphas_cumprod: np.ndarray, final_alpha_cumprod: float,
                      guidance_scale: float, timestep_input: str, threads: int | None = None) -> list[float] | None:
    """Per candidate, Σ ‖x₀(C) − x₀‖² / Σ ‖x₀‖²: deterministic DDIM through ``schedule`` (descending
    timesteps; ``grids[name]`` = [envelope (S, Z), tuned (S, Z)], row k for schedule[k]) from each
    held-out ``starts`` batch (its latent input as x at schedule[0], its other inputs as the
    condition), guided ε = ε_u + g·(ε_c − ε_u) where the batch holds [unconditional; conditional]
    halves, x₀ clipped to [−1, 1] as the sampler's; x₀ from the same graph with float activations.
    None when no model input has the output's shape (no latent to step)."""
    from qcompiler.calibration.capture import run_batch
    from qcompiler.passes.ptqd import paired_halves
    from qcompiler.runtimes.ort import make_session

    names = [n for n in plans if n in ranks]
    outputs = [value.name for value in skel.proto.graph.output][:1]
    sessions = [make_session(skel, threads=threads, lean=True),
                make_session(fake_quant_skeleton(skel, names, spec), threads=threads, lean=True)]
    inputs = [{value.name for value in s.get_inputs()} for s in sessions]
    alphas = np.asarray(alphas_cumprod, np.float64)
    error, norm = np.zeros(len(candidates)), 0.0
    for start in starts:
        paired = paired_halves(start)
        shape = np.shape(run_batch(sessions[0], outputs, start)[0])
        latent = next((n for n in sorted(inputs[0]) if n in start.feeds and n != timestep_input
                       and np.shape(start.feeds[n]) == shape), None)
        if latent is None:
            return None
        first = np.asarray(start.feeds[latent], np.float64)
        first = first[: len(first) // 2] if paired else first
        finals = []
        for c in (None, *candidates):
            session, names_in = sessions[c is not None], inputs[c is not None]
            x = first.copy()
            for k, t in enumerate(schedule):
                feeds = {n: v for n, v in start.feeds.items() if n in names_in}
                feeds[latent] = (np.concatenate([x, x]) if paired else x).astype(np.float32)
                feeds[timestep_input] = np.full(np.shape(start.feeds[timestep_input]), t,
                                                np.asarray(start.feeds[timestep_input]).dtype)
                if c is not None:
                    feeds.update(candidate_feeds(plans, ranks, grids, c, k))
                eps = np.asarray(session.run(outputs, feeds)[0], np.float64)
                if paired:
                    uncond, cond = np.split(eps, 2)
                    eps = uncond + guidance_scale * (cond - uncond)
                a_t = alphas[int(round(t))]
                a_prev = alphas[int(round(schedule[k + 1]))] if k + 1 < len(schedule) else float(final_alpha_cumprod)
                x0 = (x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
                x = np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps
            finals.append(np.clip(x, -1.0, 1.0))
        norm += float(np.square(finals[0]).sum())
        error += [float(np.square(f - finals[0]).sum()) for f in finals[1:]]
    return (error / max(norm, 1e-300)).tolist()


def output_score(error: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """D per candidate: Σ_t E[c, t]/N[t] (the single-step check, without a scheduler)."""
    seen = norm > 0
    return (error[:, seen] / norm[seen]).sum(axis=1)


def guided(batch, value: np.ndarray, scale: float) -> np.ndarray:
    """The sampler's ε for [unconditional; conditional] halves: ε_u + g·(ε_c − ε_u); else the output."""
    from qcompiler.passes.ptqd import paired_halves

    if not paired_halves(batch) or np.ndim(value) < 1 or len(value) != batch.batch_size:
        return value
    uncond, cond = np.split(np.asarray(value, np.float64), 2)
    return uncond + scale * (cond - uncond)


def sampler_schedule(source) -> tuple[np.ndarray, float] | None:
    """(ᾱ_t for every t, the final ᾱ) of the zoo's DDIM from the model JSON's scheduler configuration
    (``source``: the model path); None without one."""
    from qcompiler.diffusion.sampler import SamplerConfig, model_metadata

    try:
        config = model_metadata(source).get("scheduler_config")
    except (OSError, ValueError):
        return None
    if not config:
        return None
    scheduler = SamplerConfig(scheduler_config=config).scheduler()
    return scheduler.alphas_cumprod.numpy(), float(scheduler.final_alpha_cumprod)
