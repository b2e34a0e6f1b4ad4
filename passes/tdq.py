"""Pass ``tdq`` (TDQ, temporal dynamic quantization): activation ranges predicted from the timestep.

Per quantized GEMM input X (its K groups from ``dgq_groups`` when planned, else one group), a
small MLP maps the timestep embedding to each group's range (``qcompiler/tdq_training.py``):
    emb(t) = [sin(ω_i t), cos(ω_i t)],  ω_i = π·2^i/(2T)           (T = num_train_timesteps)
    (u, v) = W2·SiLU(W1·emb(t) + b1) + b2,   lo_g(t) = lo_g·e^{u_g},  hi_g(t) = hi_g·e^{v_g}
    s_g(t) = (hi_g(t) − lo_g(t))/(2^b − 1),   z_g(t) = round(−lo_g(t)/s_g(t))
with [lo_g, hi_g] the static (all-timestep) range, so an untrained MLP (W2 = 0) is the static grid.
Training on the calibration activations grouped by timestep (seeded Adam, one CPU thread):
fit the per-timestep min/max ranges (the ``dgq --per-timestep`` lookup), then tune on the relative
quantization error Σ_t ‖X_t − X̂_t‖²/‖X_t‖² of sampled rows (straight-through rounding).
Deploy: the MLP evaluated at every t in [0, T) gives tables S[t], Z[t] (T × K) that the target
gathers by the model's timestep input at run time, so timesteps the calibration never saw (another
step count) get their own parameters; the MLP is not in the graph.
Error bound: |X − X̂| ≤ s_g(t)/2 for X inside [lo_g(t), hi_g(t)]; values outside are clipped.
Lowering: the scales are run-time tensors and ORT's integer kernels (QLinearConv,
MatMulIntegerToFloat, QGemm) take constant ones, so the GEMM runs in float on X̂ and Ŵ: simulated,
labelled so in the report, as ``dgq --per-timestep`` is.
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
from qcompiler.tdq_training import TimestepSamples, TrainSettings, train_mlps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TdqConfig(TrainSettings):
    """The MLP's training settings (``tdq_training.TrainSettings``: embedding, hidden units,
    iterations, learning rates, seed) plus what the pass needs around them."""

    #: Rows (positions) per timestep and activation kept for the tuning loss.
    rows_per_timestep: int = 32
    timestep_input: str = "timestep"
    #: T of the table; None: the model JSON's scheduler_config.num_train_timesteps, else 1000.
    num_train_timesteps: int | None = None

    def __post_init__(self):
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise ValueError(f"TdqConfig: embedding_dim must be even and ≥ 2, got {self.embedding_dim}")
        if min(self.hidden, self.rows_per_timestep) < 1 or min(self.fit_iterations, self.tune_iterations) < 0:
            raise ValueError("TdqConfig: hidden and rows_per_timestep must be ≥ 1, iterations ≥ 0")

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
        samples = self._samples(ctx, plans)
        captured = time.perf_counter()
        spec = QuantSpec(bits=ctx.settings.abits, symmetric=False)
        parameters = 0
        names = list(plans)
        mlps = train_mlps([samples[n] for n in names], [plans[n].group_min for n in names],
                          [plans[n].group_max for n in names], spec, T, self.config.train_settings())
        for name, mlp in zip(names, mlps):
            plan = plans[name]
            plan.timesteps = np.arange(T, dtype=np.float64)
            plan.timestep_scales, plan.timestep_zero_points = mlp.table(spec)
            plan.timestep_input, plan.timestep_method = self.config.timestep_input, "tdq"
            parameters += mlp.parameters
        trained = time.perf_counter()
        calibrated = samples[next(iter(plans))].timesteps.size
        notes.append(f"{len(plans)} activations ({len(new)} per-tensor, {len(plans) - len(new)} DGQ-grouped): "
                     f"MLPs of {parameters} parameters in all, trained on {calibrated} calibrated timesteps, "
                     f"tabled at t = 0..{T - 1} (simulated lowering: run-time scales); samples {captured - started:.1f} s, "
                     f"training {trained - captured:.1f} s")
        return PassResult(False, tuple(notes))

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

    def _samples(self, ctx: CompileContext, plans: dict[str, GroupPlan]) -> dict[str, TimestepSamples]:
        """Per plan, per calibrated timestep: per-index min/max over every row, and sampled rows."""
        from qcompiler.calibration.capture import stream_tensors
        from qcompiler.calibration.statistics import StatsConfig
        from qcompiler.lowering.timestep_ranges import split_by_timestep

        by_t = split_by_timestep(ctx.calibration, self.config.timestep_input)
        timesteps = np.array(list(by_t), dtype=np.float64)
        index_of = {id(part): i for i, parts in enumerate(by_t.values()) for part in parts}
        ordered = [part for parts in by_t.values() for part in parts]
        rng = np.random.default_rng(self.config.seed)
        low: dict[str, list] = {name: [None] * timesteps.size for name in plans}
        high: dict[str, list] = {name: [None] * timesteps.size for name in plans}
        rows: dict[str, list] = {name: [[] for _ in timesteps] for name in plans}
        config = StatsConfig(progress=False, threads=ctx.threads)
        for batch, values in stream_tensors(ctx.skeleton(), ordered, list(plans), config, desc="tdq samples"):
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
