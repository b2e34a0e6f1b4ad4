"""Pass ``tdq`` (TDQ, temporal dynamic quantization): activation ranges predicted from the timestep.

Per quantized GEMM input X (its K groups from ``dgq_groups`` when planned, else one group), a
small MLP maps the timestep embedding to a correction of the per-timestep lookup's range
(``qcompiler/tdq_training.py``):
    emb(t) = [sin(ω_i t), cos(ω_i t)],  ω_i = π·2^i/(2T)           (T = num_train_timesteps)
    (u, v) = W2·SiLU(W1·emb(t) + b1) + b2,   lo_g(t) = L_lo,g(t)·e^{u_g},  hi_g(t) = L_hi,g(t)·e^{v_g}
    s_g(t) = (hi_g(t) − lo_g(t))/(2^b − 1),   z_g(t) = round(−lo_g(t)/s_g(t))
L(t) is the lookup envelope: at a calibrated t the group's min/max there (the ``dgq --per-timestep``
lookup), between two calibrated timesteps the envelope of both, beyond the ends the end ranges.
W2 = b2 = 0 at the start, so the untuned MLP reproduces the lookup exactly at the calibrated t.
Tuning (seeded Adam, one CPU thread) lowers the relative quantization error of the sampled
training rows plus each index's extremes at the calibrated t, with a penalty λ·mean(u² + v²).
The calibration rows are split by trajectory (every 4th prompt held out; each file of a collected
set holds one timestep of every trajectory, so a split by file would hold out timesteps): per
activation the tuned correction is kept only if it lowers the full-tensor relative error of the
held-out rows summed over the calibrated timesteps, else the table is the envelope. Those choices
are local; with ``output_check`` (off by default; ``qcompiler/tdq_output_check.py``) they are then
judged together on the final image: the envelope everywhere and the sets of corrections whose own
held-out gain exceeds each of ``output_check_gains`` are compared by the relative error of x₀ after
deterministic, guided DDIM through the midpoints between the calibrated timesteps from the held-out
trajectories' first inputs, every activation fake-quantized at once, vs float activations; the
lowest wins. At the calibrated timesteps the table is the calibrated range, the lookup's
(``calibrated_rows = "lookup"``; ``"check"``: the kept corrections there too, chosen by the output
check through the calibrated timesteps when it runs). The deployed envelope is that of every row's ranges.
Deploy: the MLP evaluated at every t in [0, T) gives tables S[t], Z[t] (T × K) that the target
gathers by the model's timestep input at run time, so timesteps the calibration never saw (another
step count) get their own parameters; the MLP is not in the graph.
Error bound: |X − X̂| ≤ s_g(t)/2 for X inside [lo_g(t), hi_g(t)]; values outside are clipped.
Lowering (the target's, as for ``dgq --per-timestep``): the scales are run-time tensors. The ORT
target quantizes X per batch row with its gathered (s, z) and applies s to an integer GEMM's int32
sums (``lowering/timestep_integer.py``); where that runs slower than float on ORT's CPU (Convs, K > 1
channel groups) ``--timestep-groups auto`` keeps fake quantization before a float GEMM, labelled simulated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

import numpy as np

from qcompiler.context import CompileContext
from qcompiler.errors import PassError
from qcompiler.grids import GroupPlan, quantized_gemms
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.quant import QuantSpec, scale_zero_point
from qcompiler.tdq_training import (
    TimestepMlp,
    TimestepSamples,
    TrainSettings,
    lookup_envelope,
    train_mlps,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TdqConfig(TrainSettings):
    """The MLP's training settings (``tdq_training.TrainSettings``: embedding, hidden units,
    iterations, learning rates, seed) plus what the pass needs around them."""

    #: Rows (positions) per timestep and activation kept for the tuning loss.
    rows_per_timestep: int = 32
    #: One calibration trajectory in this many is held out to accept or reject each tuned correction.
    heldout_every: int = 4
    #: Judge the kept corrections together on the final image (``qcompiler/tdq_output_check.py``):
    #: the envelope everywhere, or the corrections whose own held-out gain exceeds each of ``output_check_gains``.
    #: Off by default: on the zoo DiT its 4 held-out trajectories misjudged the 16 sampled images twice.
    output_check: bool = False
    output_check_gains: tuple[float, ...] = (0.0, 0.1, 0.3)
    #: The sampler's guidance scale: the check compares guided ε where batches hold both halves.
    guidance_scale: float = 4.0
    #: The table's rows at the calibrated timesteps: "lookup" (the range calibrated there, exactly the
    #: per-timestep lookup's; the correction acts between them) or "check" (the output check's choice).
    calibrated_rows: str = "lookup"
    timestep_input: str = "timestep"
    #: T of the table; None: the model JSON's scheduler_config.num_train_timesteps, else 1000.
    num_train_timesteps: int | None = None

    def __post_init__(self):
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(f"TdqConfig: embedding_dim must be even and ≥ 2, got {self.embedding_dim}")
        if self.calibrated_rows not in ("lookup", "check"):
            raise ValueError(f"TdqConfig: calibrated_rows must be 'lookup' or 'check', got {self.calibrated_rows!r}")
        if min(self.hidden, self.rows_per_timestep) < 1 or self.tune_iterations < 0 or self.heldout_every < 2:
            raise ValueError("TdqConfig: hidden and rows_per_timestep must be ≥ 1, tune_iterations ≥ 0, "
                             "heldout_every ≥ 2")

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})


def train_timesteps(ctx: CompileContext, configured: int | None) -> int:
    """T: the configured value, the model JSON's ``scheduler_config.num_train_timesteps``, or 1000."""
    if configured:
        return int(configured)
    from qcompiler.diffusion.sampler import model_metadata

    try:
        return int(model_metadata(ctx.source).get("scheduler_config", {}).get("num_train_timesteps", 1000))
    except (OSError, ValueError):
        return 1000


def grouped_layout(value: np.ndarray, plan: GroupPlan) -> np.ndarray:
    """(rows, N): the grouped axis last (channels, or the tokens of a (B, T, C) tensor), the rest flattened."""
    rank = value.ndim
    axis = plan.channel_axis % rank if plan.axis == "channel" else 1
    moved = np.moveaxis(value, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


class Tdq(Pass):
    """Per quantized activation, an MLP from the timestep to its (groups') ranges, deployed as a table."""

    name = "tdq"
    Config = TdqConfig

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "grouped by timestep")
        if self.config.timestep_input not in {i.name for i in ctx.graph.inputs}:
            raise PassError(f"pass '{self.name}': the model has no input '{self.config.timestep_input}' to gather "
                            f"the tables by (set tdq.timestep_input); its inputs are "
                            f"{[i.name for i in ctx.graph.inputs]}")

    def call(self, ctx: CompileContext) -> PassResult:
        notes: list[str] = []
        plans = ctx.group_plans if ctx.group_plans is not None else {}
        ctx.group_plans = plans
        new = self._per_tensor_plans(ctx, plans, notes)
        plans.update(new)
        if not plans:
            return PassResult(False, ("no quantized GEMM input", *notes))
        T = train_timesteps(ctx, self.config.num_train_timesteps)
        started = time.perf_counter()
        train, heldout = self._split(ctx)
        samples = self._samples(ctx, plans, train)
        captured = time.perf_counter()
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        names = list(plans)
        mlps = dict(zip(names, train_mlps([samples[n] for n in names], spec, T, self.config.train_settings())))
        trained = time.perf_counter()
        check: list[str] = []
        kept = self._validate(ctx, plans, mlps, samples, heldout, spec, check) if self.config.tune_iterations else {}
        parameters = 0
        for name, mlp in mlps.items():
            plan = plans[name]
            plan.timesteps = np.arange(T, dtype=np.float64)
            plan.timestep_scales, plan.timestep_zero_points = mlp.table(spec)
            plan.timestep_input, plan.timestep_method = self.config.timestep_input, "tdq"
            parameters += mlp.parameters
        calibrated = samples[names[0]].timesteps.size
        lookup_rows = "; at the calibrated t the table is the lookup" if self.config.calibrated_rows == "lookup" else ""
        notes.append(f"{len(plans)} activations ({len(new)} per-tensor, {len(plans) - len(new)} DGQ-grouped): "
                     f"MLPs of {parameters} parameters in all on {calibrated} calibrated timesteps, tabled at "
                     f"t = 0..{T - 1} (the target gathers them by timestep); tuned correction kept for "
                     f"{sum(kept.values())} of {len(kept)} (held-out error{', output check' if check else ''}"
                     f"{lookup_rows}), the lookup envelope elsewhere; samples {captured - started:.1f} s, "
                     f"training {trained - captured:.1f} s, check {time.perf_counter() - trained:.1f} s")
        notes += check
        return PassResult(False, tuple(notes))

    def _split(self, ctx: CompileContext) -> tuple[list, list]:
        """(training parts, held-out parts) of the calibration regrouped by timestep: every
        ``heldout_every``-th trajectory held out (nothing when tuning is off)."""
        from qcompiler.lowering.timestep_ranges import split_by_timestep

        by_t = split_by_timestep(ctx.calibration, self.config.timestep_input)
        train, heldout = [], []
        for parts in by_t.values():
            for part in parts:
                mask = heldout_rows(part, self.config.heldout_every) if self.config.tune_iterations else None
                if mask is None or not mask.any() or mask.all():
                    train.append(part)
                    continue
                train.append(select_rows(part, ~mask, "train"))
                heldout.append(select_rows(part, mask, "held out"))
        return train, heldout

    def _per_tensor_plans(self, ctx: CompileContext, plans: dict, notes: list[str]) -> dict[str, GroupPlan]:
        """A one-group plan for every quantized GEMM input that has neither a plan nor a QDQ yet."""
        consumers: dict[str, tuple[object, set[str]]] = {}
        for node in quantized_gemms(ctx.graph):
            tensor = node.inputs[0]
            if tensor.name in plans or (tensor.inputs and tensor.inputs[0].op == "DequantizeLinear"):
                continue
            consumers.setdefault(tensor.name, (tensor, set()))[1].add(node.op)
        axes = {}
        for name, (_, ops) in consumers.items():
            if "Conv" in ops and ops != {"Conv"}:
                notes.append(f"'{name}' feeds both Conv and MatMul; it keeps static per-tensor quantization")
                continue
            axes[name] = 1 if ops == {"Conv"} else None
        if not axes:
            return {}
        stats = ctx.statistics(axes)
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        new = {}
        for name, axis in axes.items():
            low, high = np.array([stats[name].min]), np.array([stats[name].max])
            scale, zero_point = scale_zero_point(low, high, spec)
            labels = np.zeros(stats[name].channel_min.size, np.int64)
            new[name] = GroupPlan(name, "channel", -1 if axis is None else axis, labels, scale, zero_point,
                                  low, high, spec.bits, 0.0, 0.0)
        return new

    def _samples(self, ctx: CompileContext, plans: dict[str, GroupPlan], parts: list) -> dict[str, TimestepSamples]:
        """Per plan, per calibrated timestep: per-index min/max over every row, and sampled rows."""
        from qcompiler.calibration.capture import stream_tensors
        from qcompiler.calibration.statistics import StatsConfig
        from qcompiler.lowering.timestep_ranges import batch_timesteps

        step_of = [float(batch_timesteps(part, self.config.timestep_input)[0]) for part in parts]
        timesteps = np.array(sorted(set(step_of)), dtype=np.float64)
        index_of = {id(part): int(np.searchsorted(timesteps, t)) for part, t in zip(parts, step_of)}
        rng = np.random.default_rng(self.config.seed)
        low: dict[str, list] = {name: [None] * timesteps.size for name in plans}
        high: dict[str, list] = {name: [None] * timesteps.size for name in plans}
        rows: dict[str, list] = {name: [[] for _ in timesteps] for name in plans}
        config = StatsConfig(progress=False, threads=ctx.threads)
        for batch, values in stream_tensors(ctx.skeleton(), parts, list(plans), config, desc="tdq samples"):
            i = index_of[id(batch)]
            for name, value in values.items():
                flat = grouped_layout(np.asarray(value, np.float32), plans[name])
                lo, hi = flat.min(axis=0), flat.max(axis=0)
                low[name][i] = lo if low[name][i] is None else np.minimum(low[name][i], lo)
                high[name][i] = hi if high[name][i] is None else np.maximum(high[name][i], hi)
                take = rng.choice(flat.shape[0], size=min(self.config.rows_per_timestep, flat.shape[0]), replace=False)
                rows[name][i].append(flat[np.sort(take)])
            del values
        out = {}
        for name, plan in plans.items():
            per_t = [np.concatenate(r)[: self.config.rows_per_timestep] for r in rows[name]]
            count = min(len(r) for r in per_t)
            out[name] = TimestepSamples(timesteps, np.stack(low[name]), np.stack(high[name]),
                                        np.stack([r[:count] for r in per_t]), plan.labels)
        return out

    def _validate(self, ctx: CompileContext, plans: dict[str, GroupPlan], mlps: dict[str, TimestepMlp],
                  samples: dict[str, TimestepSamples], heldout: list, spec: QuantSpec,
                  notes: list[str]) -> dict[str, bool]:
        """Keep each tuned correction only if it lowers the held-out rows' full-tensor relative error
        Σ_t ‖X_t − X̂_t‖²/‖X_t‖² and, with ``output_check``, belongs to the candidate set with the lowest
        held-out denoiser-output error (else ``reset``: the envelope); then rebase every table on the
        envelope of all rows' ranges (training and held out). {activation: tuned kept}."""
        from qcompiler.calibration.capture import stream_tensors
        from qcompiler.calibration.statistics import StatsConfig
        from qcompiler.lowering.timestep_ranges import batch_timesteps

        if not heldout:
            log.info("tdq: no held-out trajectories (fewer than %d per batch): tuned corrections dropped",
                     self.config.heldout_every)
            for mlp in mlps.values():
                mlp.reset()
            return dict.fromkeys(mlps, False)
        low = {n: samples[n].low.copy() for n in plans}
        high = {n: samples[n].high.copy() for n in plans}
        timesteps = samples[next(iter(plans))].timesteps
        # err[name][candidate][t] and the held-out ‖X_t‖², candidate 0 = envelope, 1 = tuned.
        err = {n: np.zeros((2, timesteps.size)) for n in plans}
        norm = {n: np.zeros(timesteps.size) for n in plans}
        grids = {}
        for n, mlp in mlps.items():
            tuned = mlp.ranges(timesteps)
            envelope = (mlp.base_low[np.rint(timesteps).astype(np.int64)], mlp.base_high[np.rint(timesteps).astype(np.int64)])
            grids[n] = [scale_zero_point(*r, spec) for r in (envelope, tuned)]
        config = StatsConfig(progress=False, threads=ctx.threads)
        ranks: dict[str, int] = {}
        for batch, values in stream_tensors(ctx.skeleton(), heldout, list(plans), config, desc="tdq held-out check"):
            t = float(batch_timesteps(batch, self.config.timestep_input)[0])
            i = int(np.searchsorted(timesteps, t))
            if i >= timesteps.size or timesteps[i] != t:
                continue
            for name, value in values.items():
                ranks[name] = np.ndim(value)
                flat = grouped_layout(np.asarray(value, np.float32), plans[name])
                low[name][i] = np.minimum(low[name][i], flat.min(axis=0))
                high[name][i] = np.maximum(high[name][i], flat.max(axis=0))
                norm[name][i] += float(np.square(flat, dtype=np.float64).sum())
                for c, (scale, zero_point) in enumerate(grids[name]):
                    s, z = scale[i][plans[name].labels], zero_point[i][plans[name].labels].astype(np.float32)
                    q = (np.clip(np.rint(flat / s) + z, spec.qmin, spec.qmax) - z) * s
                    err[name][c, i] += float(np.square(q - flat, dtype=np.float64).sum())
            del values
        gains = {}
        for name in mlps:
            relative = (err[name] / np.maximum(norm[name], 1e-30)).sum(axis=1)
            gains[name] = float(1.0 - relative[1] / max(relative[0], 1e-30))
            log.debug("tdq %s: held-out relative error envelope %.4g, tuned %.4g", name, *relative)
        T = next(iter(mlps.values())).num_train_timesteps
        kept = {name: gain > 0 for name, gain in gains.items()}
        between = dict(kept)
        if self.config.output_check:
            kept, between = self._output_check(ctx, plans, ranks, grids, mlps, timesteps, heldout, gains, spec,
                                               notes)
        if self.config.calibrated_rows == "lookup":
            kept = dict.fromkeys(kept, False)
        calibrated = np.zeros(T, bool)
        calibrated[np.clip(np.rint(timesteps).astype(np.int64), 0, T - 1)] = True
        for name, mlp in mlps.items():
            if kept[name] != between[name]:  # the correction on the calibrated rows only, or on the others only
                mlp.corrected = calibrated if kept[name] else ~calibrated
            kept[name] = kept[name] or between[name]
            if not kept[name]:
                mlp.reset()
            merged = TimestepSamples(timesteps, low[name], high[name], samples[name].values, plans[name].labels)
            mlp.base_low, mlp.base_high = lookup_envelope(timesteps, *merged.group_ranges(), T)
        return kept


    def _output_check(self, ctx, plans, ranks, grids, mlps, timesteps, heldout, gains, spec,
                      notes) -> tuple[dict[str, bool], dict[str, bool]]:
        """({activation: tuned kept on the calibrated rows}, {…: on the rows between them}): of the
        candidate sets (``tdq_output_check.candidate_sets``), the one with the lowest held-out error
        of the final image (``trajectory_errors``) with DDIM through the calibrated timesteps, and the
        one through the midpoints between them (the timesteps another step count meets, where the
        table is the MLP's interpolation, not a calibrated range). Without a scheduler configuration
        or a latent input: the single-step output error at the calibrated t decides both."""
        from qcompiler.lowering.timestep_ranges import batch_timesteps
        from qcompiler.tdq_output_check import (
            candidate_sets,
            guided,
            output_errors,
            output_score,
            sampler_schedule,
            trajectory_errors,
        )

        candidates = candidate_sets(gains, self.config.output_check_gains)
        if len(candidates) == 1:
            nothing = dict.fromkeys(gains, False)  # no correction passed its own check: nothing to compare
            return nothing, nothing
        timestep_of = lambda b: float(batch_timesteps(b, self.config.timestep_input)[0])  # noqa: E731
        schedule = sampler_schedule(ctx.source)
        starts = [b for b in heldout if timestep_of(b) == timesteps[-1]]
        schedules = {"calibrated t": timesteps[::-1],
                     "midpoints": np.setdiff1d(np.rint((timesteps[1:] + timesteps[:-1]) / 2), timesteps)[::-1]}
        if self.config.calibrated_rows == "lookup":
            del schedules["calibrated t"]
        scores = {}
        if schedule is not None and starts:
            for label, steps in schedules.items():
                rows = steps.astype(np.int64)
                at = {n: [scale_zero_point(mlp.base_low[rows], mlp.base_high[rows], spec),
                          scale_zero_point(*mlp.ranges(steps), spec)] for n, mlp in mlps.items()}
                found = trajectory_errors(ctx.skeleton(), plans, ranks, at, steps, starts, candidates, spec, *schedule,
                                          self.config.guidance_scale, self.config.timestep_input, ctx.threads)
                if found is None:
                    scores = {}
                    break
                scores[label] = found
        what = "final images of the held-out trajectories, DDIM"
        if not scores:
            what = "single-step held-out output, Σ_t relative error"
            single = output_score(*output_errors(ctx.skeleton(), plans, ranks, grids, timesteps, heldout,
                                                 candidates, spec, timestep_of,
                                                 lambda b, v: guided(b, v, self.config.guidance_scale),
                                                 ctx.threads))
            scores = {label: single for label in schedules}
        labels = ["envelope" if not c else f"{len(c)} tuned" for c in candidates]
        best = {label: int(np.argmin(s)) for label, s in scores.items()}  # the first of equals: smallest first
        per_schedule = [f"through the {label}: " + ", ".join(f"{c} {e:.4g}" for c, e in zip(labels, s))
                        + f" → {labels[best[label]]}" for label, s in scores.items()]
        notes.append(f"output check ({what}; relative error vs float activations): " + "; ".join(per_schedule))
        pick = lambda label: {n: n in candidates[best[label]] for n in gains}  # noqa: E731
        lookup = dict.fromkeys(gains, False)
        return (pick("calibrated t") if "calibrated t" in scores else lookup), pick("midpoints")


def heldout_rows(batch, every: int) -> np.ndarray | None:
    """Rows of one trajectory in ``every`` (a prompt's unconditional and conditional rows together
    when the batch is [unconditional; conditional] halves); None for a single-row batch."""
    from qcompiler.passes.ptqd import paired_halves

    n = batch.batch_size
    if n < 2:
        return None
    trajectory = np.arange(n) % (n // 2) if paired_halves(batch) else np.arange(n)
    return trajectory % every == every - 1


def select_rows(batch, mask: np.ndarray, what: str):
    from qcompiler.calibration.readers import CalibrationBatch

    rows = np.flatnonzero(mask)
    n = batch.batch_size
    pick = lambda v: v[rows] if np.ndim(v) >= 1 and len(v) == n else v  # noqa: E731
    return CalibrationBatch({k: pick(v) for k, v in batch.feeds.items()},
                            {k: pick(v) for k, v in batch.metadata.items()}, f"{batch.source} ({what})")
