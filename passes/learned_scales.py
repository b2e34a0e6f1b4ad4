"""Pass ``learned_scales`` (DMQ LES): learn a per-input-channel γ per GEMM on its calibration inputs, then fold it.

Rewrite, per scale group (an activation X and the Linears/Convs reading it; Q, K, V share one γ):
    X → X/γ ;  W → W·γ   (W[k, :]·γ_k along the input axis)              (folded by ``qcompiler.folding.fold``)
γ = exp(θ) (always > 0), θ learned with torch (Adam, lr ``lr``, cosine decay to 0, ``iterations`` steps)
on the group's recorded calibration inputs X_n (n = one batch row of the model input = one sample):
    Ŷ_n = Q_a(X_n/γ) ⊛ Q_w(W·γ)          Y_n = X_n ⊛ W          (⊛: MatMul or the Conv; bias cancels)
    ℓ_n = mean((Y_n − Ŷ_n)²)  summed over the group's consumers
         (``output_weighting="downstream"``: mean(v_o·(Y_n,o − Ŷ_n,o)²) with v_o, mean 1, what the next
         Linear/Conv layers weigh output channel o by, Σ‖W_next[:, o]‖²; ``qcompiler.downstream``)
    Q_a: asymmetric per tensor, ``abits``: s = (hi − lo)/(2^b − 1), z = round(−lo/s), with
         [lo, hi] = [min_c(min_c X/γ_c), max_c(max_c X/γ_c)] ∪ {0} recomputed from γ at every step
         (min_c, max_c: per-channel ranges over the WHOLE calibration set, the range that
         ``insert_activation_qdq`` will calibrate after the fold, so training and lowering agree);
    Q_w: symmetric per output channel, ``wbits`` (int4 blocks along K for a W4 MatMul, its
         MatMulNBits lowering); s_w = r·max|W·γ|/(2^(b−1) − 1) with r = 1 (default), or r from
         an MSE clip search over ``weight_clip_ratios`` (no gradient), as ``quantize_weights`` lowers it.
    Both round with a straight-through estimator (round(x) = x + stopgrad(round(x) − x)); the
    scales are functions of γ and pass gradients.
Adaptive timestep weighting (docs/algorithms.md §5.2, optional): each sample carries its timestep t (the
calibration's ``__timestep__``). L_t = EMA(momentum 0.95) of the mean loss of samples at t
(initialised by one pass over the pool at the initial γ), w_t = (1 − L_t/Σ_t L_t)^r (r = 20;
``"linear"``: r = 1), loss = mean_n(w_{t_n}·ℓ_n) over the mini-batch. Timesteps whose loss is
small (the noisy early steps, where the error starts to accumulate) get the larger weights.
Row → timestep: a group input's leading axis is the model's batch axis; when it is a multiple
k of the batch rows (e.g. (B·T, C)) row i belongs to sample i // k; otherwise (or when the
calibration has no ``__timestep__``) the group is trained unweighted and the notes say so.

Held-out samples (``holdout``, default 25%): every 4th selected calibration batch (a timestep or
prompt file; every 4th sample when there are fewer than 4 batches) is kept out of training. Every
``check_every`` steps the mean held-out ℓ is measured and the best θ so far kept; training stops
after ``patience`` checks without a new best (early stopping picks the number of steps).
Guard: after training, the unweighted error of the learned γ, of the initial γ and of γ = 1 on the
held-out samples are compared and the lowest wins (recorded as ``kept``), so the pass never accepts
a γ that raises a layer's simulated quantized output error on samples it did not train on over
plain per-tensor quantization (``holdout = 0``: trained and judged on every sample, as before).

Exact before quantization: X·W = (X/γ)·(γ·W); the producer (Norm affine, a Linear/Conv's output
channels, the V projection) or an explicit Mul (after SiLU/GELU; listed in ``ctx.fallbacks``)
writes X/γ. Groups with one input channel are skipped (a per-tensor quantizer is scale-invariant),
and so are Conv readers that are not 2-D (the torch model uses conv2d).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qcompiler.context import CompileContext
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.downstream import output_channel_weights
from qcompiler.folding import ScaleGroup, find_absorber, find_scale_groups, fold
from qcompiler.les_training import (TIMESTEP_KEY, GroupProblem, TimestepWeights, collect_inputs,
                                           holdout_items, import_torch, learn_gamma, sample_timesteps,
                                           select_samples, timestep_weights)
from qcompiler.passes.smooth_scales import smooth_scale, weight_row_absmax
from qcompiler.patterns import Conv, match_conv, weight_array

__all__ = ["TIMESTEP_KEY", "GroupProblem", "LearnedScales", "LearnedScalesConfig", "TimestepWeights",
           "collect_inputs", "import_torch", "learn_gamma", "sample_timesteps", "select_samples",
           "timestep_weights", "weight_row_absmax_any"]


@dataclass(frozen=True)
class LearnedScalesConfig:
    #: Adam steps per group (the paper: 6,000 at lr 1e-3); see benchmarks/results/dmq.md for the trade-off.
    iterations: int = 100
    #: 1e-2, not the paper's 1e-3: with 60× fewer steps, θ = log γ must move further per step (measured
    #: on UNet layers: 200 steps at 1e-2 reach a lower error than at 1e-3, close to 800 steps).
    lr: float = 1e-2
    #: "ones" (γ = 1, docs/algorithms.md §5.2) or "smoothquant" (γ = max|X|^α / max|W|^(1−α)).
    init: str = "ones"
    alpha: float = 0.5
    #: Calibration samples (batch rows) kept per group, spread over the calibration files (timesteps).
    samples: int = 64
    #: Samples per Adam step.
    batch_size: int = 8
    #: "adaptive": w_t = (1 − L_t/ΣL)^power; "linear": power 1; "off": every sample weighs 1.
    timestep_weighting: str = "adaptive"
    power: float = 20.0
    momentum: float = 0.95
    #: Weight scales in the training forward: r·max|W·γ|/qmax with r from an MSE clip search over
    #: these ratios (``quantize_weights.DEFAULT_CLIP_RATIOS`` = what dmq lowers), or (1.0,): min/max.
    #: Min/max by default: training on the clip-searched grid measured 22.85 dB vs 24.09 dB final-image
    #: PSNR on the UNet at W4A8 (32 images, benchmarks/README.md), i.e. no gain within the run-to-run drift.
    weight_clip_ratios: tuple[float, ...] = (1.0,)
    #: Also learn γ for groups that no producer can absorb (an explicit Mul at run time).
    allow_explicit: bool = True
    exclude_nodes: tuple[str, ...] = ()
    #: Share of the selected samples held out of training: whole calibration batches (timesteps /
    #: prompts), every round(1/holdout)-th one, or every such sample when there are fewer batches.
    #: They decide early stopping and the guard (0: train and judge on every sample, as before).
    holdout: float = 0.25
    #: ℓ_n relative to the sample's output energy, ‖Y_n − Ŷ_n‖²/‖Y_n‖², in training and the guard:
    #: the noisy early timesteps, whose activations are largest, then do not decide γ alone.
    relative_loss: bool = False
    #: "downstream": weight each output channel's squared error by what the next Linear/Conv layers
    #: give it, v_o = Σ ‖W_next[:, o]‖²·(per-channel constant factors on the way)², normalised to mean 1
    #: (``qcompiler.downstream``; unweighted where a path ends elsewhere, e.g. attention scores).
    #: "off": every output channel alike (the layer's plain output error).
    output_weighting: str = "off"
    #: The weight quantizer that early stopping and the guard measure with: the clip-search ratios of
    #: the recipe's ``quantize_weights`` (what will be lowered), None: the training quantizer above.
    #: A γ that helps min/max weights can hurt clip-searched ones, which already cut the outliers.
    guard_clip_ratios: tuple[float, ...] | None = None
    #: γ ≠ 1 is kept only when it lowers the judged error by at least this share over γ = 1.
    min_gain: float = 0.0
    #: Held-out error measured every this many Adam steps; the best θ so far is kept.
    check_every: int = 10
    #: Stop after this many checks without a new best held-out error (0: run every iteration).
    patience: int = 3
    #: Group inputs read per ORT run while collecting samples (bounds memory).
    tensors_per_run: int = 8
    threads: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.iterations < 0 or self.lr <= 0 or self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"LearnedScalesConfig: iterations ≥ 0, lr > 0, samples ≥ 1, batch_size ≥ 1, got {self}")
        if self.init not in ("ones", "smoothquant"):
            raise ValueError(f"LearnedScalesConfig: init must be 'ones' or 'smoothquant', got '{self.init}'")
        if self.timestep_weighting not in ("adaptive", "linear", "off"):
            raise ValueError("LearnedScalesConfig: timestep_weighting must be 'adaptive', 'linear' or 'off', "
                             f"got '{self.timestep_weighting}'")
        if not self.weight_clip_ratios or not all(0 < r <= 1 for r in self.weight_clip_ratios):
            raise ValueError(f"LearnedScalesConfig: weight_clip_ratios must be in (0, 1], got {self.weight_clip_ratios}")
        if self.guard_clip_ratios is not None and not all(0 < r <= 1 for r in self.guard_clip_ratios or (0,)):
            raise ValueError(f"LearnedScalesConfig: guard_clip_ratios must be in (0, 1], got {self.guard_clip_ratios}")
        if self.output_weighting not in ("off", "downstream"):
            raise ValueError(f"LearnedScalesConfig: output_weighting must be 'off' or 'downstream', "
                             f"got '{self.output_weighting}'")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"LearnedScalesConfig: 0 ≤ min_gain < 1 required, got {self.min_gain}")
        if not 0.0 <= self.holdout < 1.0 or self.check_every < 1 or self.patience < 0:
            raise ValueError(f"LearnedScalesConfig: 0 ≤ holdout < 1, check_every ≥ 1, patience ≥ 0 required, got {self}")
        if not 0.0 <= self.momentum < 1.0 or self.power <= 0:
            raise ValueError(f"LearnedScalesConfig: 0 ≤ momentum < 1 and power > 0 required, got {self}")


class LearnedScales(Pass):
    """X → X/γ ; W → W·γ with γ = exp(θ) learned per scale group on its quantized output error (DMQ LES).

    See the module docstring for the loss, the quantizers, the timestep weighting and the guard.
    Exact before quantization (the fold re-associates X·W); quantization happens in later passes.
    """

    name = "learned_scales"
    Config = LearnedScalesConfig
    exact = True

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "(the layers' inputs)")
        import_torch(self.name)

    def call(self, ctx: CompileContext) -> PassResult:
        torch = import_torch(self.name)
        config = self.config
        groups = [g for g in find_scale_groups(ctx.graph, include_conv=True)
                  if g.channels > 1 and not any(u.node.name in config.exclude_nodes for u in g.consumers)
                  and (not isinstance(g.consumers[0], Conv) or weight_array(g.consumers[0]).ndim == 4)]
        if not config.allow_explicit:
            groups = [g for g in groups if find_absorber(ctx.graph, g)]
        if not groups:
            return PassResult(False, ("no Linear/Conv reads a multi-channel activation",))
        stats = ctx.statistics({g.name: g.channel_axis for g in groups}, progress=config.progress)
        stats = {g.name: (stats[g.name].channel_min.copy(), stats[g.name].channel_max.copy()) for g in groups}
        batches = select_samples(ctx.calibration, config.samples, config.seed)
        timesteps = sample_timesteps(batches) if config.timestep_weighting != "off" else None
        held_samples, every = held_out_samples(batches, config.holdout)
        best_steps = []
        notes = []
        if config.timestep_weighting != "off" and timesteps is None:
            notes.append("timestep weighting off: the calibration has no __timestep__ (not a diffusion collection)")
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        kinds: dict[str, int] = {}
        kept: dict[str, int] = {}
        ratios, unmapped, weighted = [], 0, 0
        started = time.perf_counter()
        try:
            # Downstream groups first (as smooth_scales): an upstream group then trains on weights whose
            # output channels already carry the downstream γ, the weights that will be quantized.
            ordered = list(reversed(groups))
            for start in range(0, len(ordered), config.tensors_per_run):
                chunk = ordered[start:start + config.tensors_per_run]
                values = collect_inputs(ctx, batches, [g.name for g in chunk], config.tensors_per_run)
                for number, group in enumerate(chunk, start + 1):
                    x, rows = values.pop(group.name)
                    item_timesteps = timesteps[rows] if timesteps is not None and rows is not None else None
                    unmapped += timesteps is not None and rows is None
                    weights = ([output_channel_weights(ctx.graph, unit) for unit in group.consumers]
                               if config.output_weighting == "downstream" else None)
                    weighted += weights is not None and any(w is not None for w in weights)
                    problem = GroupProblem(torch, group, x, *stats[group.name], ctx.settings,
                                           config.weight_clip_ratios, config.relative_loss, weights)
                    gamma0 = self._initial(group, stats[group.name])
                    held = holdout_items(rows, problem.items, held_samples, every)
                    result = learn_gamma(torch, problem, gamma0, config, item_timesteps,
                                         desc=f"{self.name} {number}/{len(ordered)}", progress=config.progress,
                                         held_out=held)
                    best_steps.append(result["best_step"])
                    del problem
                    kept[result["kept"]] = kept.get(result["kept"], 0) + 1
                    if result["errors"]["ones"] > 0:
                        ratios.append(result["errors"][result["kept"]] / result["errors"]["ones"])
                    if not np.all(result["gamma"] == 1.0):
                        kind = fold(ctx, group, result["gamma"], None, self.name).split(":")[0]
                        kinds[kind] = kinds.get(kind, 0) + 1
        finally:
            torch.set_num_threads(threads)
        ctx.graph.cleanup().toposort()
        summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        samples = sum(b.batch_size for b in batches)
        notes.insert(0, f"{len(groups)} groups, {config.iterations} iterations each on {samples}"
                        f" samples ({time.perf_counter() - started:.1f} s); folded into: {summary}")
        if ratios:
            judged = (f"on {len(held_samples)} held-out samples" if len(held_samples) else "on the training samples")
            notes.append(f"simulated output error vs γ = 1 {judged}: median ×{np.median(ratios):.3f}, "
                         f"best ×{np.min(ratios):.3f}; kept {kept}")
        if config.output_weighting == "downstream":
            notes.append(f"output error weighted by the next layers' channel weights in {weighted} of {len(groups)} groups")
        if len(held_samples) and best_steps:
            notes.append(f"early stopping: best held-out step median {int(np.median(best_steps))} of {config.iterations}")
        if config.timestep_weighting != "off" and timesteps is not None:
            notes.append(f"timestep weighting '{config.timestep_weighting}' over {len(np.unique(timesteps))} timesteps"
                         + (f"; {unmapped} groups unweighted (rows not a multiple of the batch)" if unmapped else ""))
        return PassResult(bool(kinds), tuple(notes))

    def _initial(self, group: ScaleGroup, ranges) -> np.ndarray:
        if self.config.init == "ones":
            return np.ones(group.channels)
        absmax = np.maximum(np.abs(ranges[0]), np.abs(ranges[1]))
        return smooth_scale(absmax, weight_row_absmax_any(group), self.config.alpha)


def held_out_samples(batches, share: float) -> tuple[np.ndarray, int]:
    """(indices of held-out samples, every): every round(1/share)-th selected batch (a timestep or
    prompt file) is held out whole; with fewer batches than that, every such sample."""
    if share <= 0:
        return np.zeros(0, np.int64), 0
    every = max(2, int(round(1 / share)))
    sizes = [b.batch_size for b in batches]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
    if len(batches) >= every:
        held = [np.arange(start, start + size) for j, (start, size) in enumerate(zip(starts, sizes))
                if j % every == every - 1]
        return np.concatenate(held).astype(np.int64), every
    total = int(sum(sizes))
    return np.arange(every - 1, total, every, dtype=np.int64), every


def weight_row_absmax_any(group: ScaleGroup) -> np.ndarray:
    """max |W_j·| per input channel j over the group's consumers (Linear [K, N] or Conv [O, C, kh, kw])."""
    if not isinstance(group.consumers[0], Conv):
        return weight_row_absmax(group)
    rows = [np.abs(weight_array(match_conv(u.node))).max(axis=(0, 2, 3)) for u in group.consumers]
    return np.max(rows, axis=0)
