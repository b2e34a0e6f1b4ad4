"""Pass ``ptqd`` (PTQD): correct the quantized denoiser's output noise, per timestep (runs after lowering).

The quantized output is ε̂ = ε + Δ. On the calibration inputs (the float sampler's trajectories),
per calibrated timestep t, with ε the float model's output and Δ = ε̂ − ε over every element:
    k_t = ⟨Δ, ε⟩/⟨ε, ε⟩                        (least squares: Δ = k_t·ε + Δ′, Δ′ ⟂ ε)
    σ²_t = ‖Δ − k_t·ε‖²/n                      (the residual's mean square)
Rewrite: ε̃ = ε̂·c[t], c[t] = 1/(1 + k(t)), a Mul by a table gathered by the model's timestep input;
k(t) is interpolated linearly between the calibrated timesteps (held at the ends), so the table has
a row for every t in [0, T). Then ε̃ = ε + Δ′/(1 + k_t): the correlated part is gone and the residual's
variance is σ²_t/(1 + k_t)², which the model's metadata records (``qcompile.ptqd``) for a stochastic
sampler to subtract from its noise (``qcompiler/diffusion/ptqd.py``); with guidance the residuals of
the two halves are recorded apart with their covariance, so the sampler can combine them for any
guidance scale. Deterministic DDIM (η = 0) adds no noise: only the output correction applies there.
Exact: the Mul is the formula (checked to float rounding in tests); whether it helps depends on k_t,
which the report lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from qcompiler.context import CompileContext
from qcompiler.errors import PassError
from qcompiler.pass_manager import Pass, PassResult

from qcompiler.diffusion.ptqd import METADATA_KEY


@dataclass(frozen=True)
class PtqdConfig:
    timestep_input: str = "timestep"
    #: The denoiser output to correct; None: the graph's first output.
    output: str | None = None
    #: T of the correction table; None: the model JSON's scheduler_config.num_train_timesteps, else 1000.
    num_train_timesteps: int | None = None
    #: Fold 1/(1 + k_t) into the output (False: only measure and record).
    correct_output: bool = True


class TimestepSums:
    """Running sums per timestep from which k_t and the residual (co)variances follow in closed form."""

    KEYS = ("de", "ee", "dd", "n", "dd_u", "de_u", "ee_u", "dd_c", "de_c", "ee_c", "dd_uc", "de_uc", "ee_uc", "n_half")

    def __init__(self):
        self.sums: dict[float, dict[str, float]] = {}

    def add(self, t: float, eps: np.ndarray, delta: np.ndarray, paired: bool) -> None:
        """``eps``/``delta`` (rows, ...) at timestep t; ``paired``: rows are [unconditional; conditional]."""
        s = self.sums.setdefault(float(t), dict.fromkeys(self.KEYS, 0.0))
        e, d = eps.astype(np.float64).ravel(), delta.astype(np.float64).ravel()
        s["de"] += d @ e
        s["ee"] += e @ e
        s["dd"] += d @ d
        s["n"] += e.size
        if paired:
            half = len(eps) // 2
            eu, ec = eps[:half].astype(np.float64).ravel(), eps[half:].astype(np.float64).ravel()
            du, dc = delta[:half].astype(np.float64).ravel(), delta[half:].astype(np.float64).ravel()
            for key, value in (("dd_u", du @ du), ("de_u", du @ eu), ("ee_u", eu @ eu), ("dd_c", dc @ dc),
                               ("de_c", dc @ ec), ("ee_c", ec @ ec), ("dd_uc", du @ dc),
                               ("de_uc", du @ ec + eu @ dc), ("ee_uc", eu @ ec), ("n_half", eu.size)):
                s[key] += value

    def estimates(self) -> dict:
        """Per timestep (ascending): k, the corrected residual variance and, when paired, its 2×2 covariance."""
        out = {"timesteps": [], "k": [], "residual_variance": []}
        paired = all(s["n_half"] > 0 for s in self.sums.values())
        if paired:
            out.update(residual_variance_uncond=[], residual_variance_cond=[], residual_covariance=[])
        for t in sorted(self.sums):
            s = self.sums[t]
            k = s["de"] / s["ee"] if s["ee"] > 0 else 0.0
            shrink = 1.0 / (1.0 + k) ** 2  # ε̃ = ε + Δ′/(1 + k)
            out["timesteps"].append(t)
            out["k"].append(k)
            out["residual_variance"].append(max(s["dd"] - 2 * k * s["de"] + k * k * s["ee"], 0.0) / s["n"] * shrink)
            if paired:
                n = s["n_half"]
                out["residual_variance_uncond"].append((s["dd_u"] - 2 * k * s["de_u"] + k * k * s["ee_u"]) / n * shrink)
                out["residual_variance_cond"].append((s["dd_c"] - 2 * k * s["de_c"] + k * k * s["ee_c"]) / n * shrink)
                out["residual_covariance"].append((s["dd_uc"] - k * s["de_uc"] + k * k * s["ee_uc"]) / n * shrink)
        return out


def correction_table(timesteps, k, num_train_timesteps: int) -> np.ndarray:
    """c[t] = 1/(1 + k(t)) for t = 0..T−1, k linear between calibrated timesteps, constant beyond."""
    k_all = np.interp(np.arange(num_train_timesteps), np.asarray(timesteps, float), np.asarray(k, float))
    return (1.0 / (1.0 + k_all)).astype(np.float32)


def paired_halves(batch) -> bool:
    """Rows are [unconditional; conditional] halves (``qcompile collect``: ``__label__`` −1 on the first half)."""
    labels = batch.metadata.get("__label__")
    if labels is None or np.ndim(labels) != 1 or len(labels) % 2:
        return False
    half = len(labels) // 2
    return bool(np.all(labels[:half] == -1) and np.all(labels[half:] >= 0))


class Ptqd(Pass):
    """k_t and σ²_t from float vs quantized outputs on calibration; ε̂·1/(1 + k_t) folded into the output."""

    name = "ptqd"
    Config = PtqdConfig
    #: Runs on the lowered graph: the noise it measures is the deployed model's.
    after_lowering = True

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "(float vs quantized outputs per timestep)")
        if self.config.timestep_input not in {i.name for i in ctx.graph.inputs}:
            raise PassError(f"pass '{self.name}': the model has no input '{self.config.timestep_input}' "
                            f"(set ptqd.timestep_input); its inputs are {[i.name for i in ctx.graph.inputs]}")
        outputs = [o.name for o in ctx.graph.outputs]
        if self.config.output is not None and self.config.output not in outputs:
            raise PassError(f"pass '{self.name}': the model has no output '{self.config.output}'; its outputs "
                            f"are {outputs}")

    def call(self, ctx: CompileContext) -> PassResult:
        from qcompiler.passes.tdq import train_timesteps

        output = self.config.output or ctx.graph.outputs[0].name
        sums = self.measure(ctx, output)
        estimates = sums.estimates()
        T = train_timesteps(ctx, self.config.num_train_timesteps)
        estimates.update(num_train_timesteps=T, output=output, corrected=self.config.correct_output)
        if self.config.correct_output:
            self.fold(ctx, output, correction_table(estimates["timesteps"], estimates["k"], T))
        ctx.metadata[METADATA_KEY] = json.dumps(estimates)
        k = np.array(estimates["k"])
        v = np.array(estimates["residual_variance"])
        return PassResult(self.config.correct_output,
                          (f"k_t over {k.size} timesteps: {k.min():+.4f}..{k.max():+.4f} (mean {k.mean():+.4f}); "
                           f"residual variance {v.min():.3g}..{v.max():.3g}; "
                           + ("output × 1/(1 + k_t) folded" if self.config.correct_output else "output unchanged"),))

    def measure(self, ctx: CompileContext, output: str) -> TimestepSums:
        from qcompiler.lowering.timestep_ranges import batch_timesteps
        from qcompiler.runtimes.ort import make_session

        float_session = make_session(ctx.source if isinstance(ctx.source, str) and ctx.source != "model"
                                     else ctx.template, threads=ctx.threads, lean=True)
        quant_session = make_session(ctx.skeleton(), threads=ctx.threads, lean=True)
        names = {i.name for i in quant_session.get_inputs()}
        sums = TimestepSums()
        for batch in ctx.calibration:
            feeds = {k: v for k, v in batch.feeds.items() if k in names}
            eps = float_session.run([output], feeds)[0]
            delta = quant_session.run([output], feeds)[0] - eps
            t = batch_timesteps(batch, self.config.timestep_input)
            paired = paired_halves(batch) and np.unique(t).size == 1
            for value in np.unique(t):
                rows = t == value
                sums.add(value, eps[rows], delta[rows], paired)
        return sums

    def fold(self, ctx: CompileContext, output: str, table: np.ndarray) -> None:
        """y → y_raw · Reshape(Gather(c, t), (B, 1, …)): the graph output keeps its name."""
        import onnx_graphsurgeon as gs

        from qcompiler.lowering.channel_groups import Builder
        from qcompiler.lowering.timestep_ranges import timestep_index

        y = next(o for o in ctx.graph.outputs if o.name == output)
        producer = y.inputs[0]
        raw = gs.Variable(ctx.names.make(output, self.name, "uncorrected"), dtype=y.dtype, shape=y.shape)
        producer.outputs[producer.outputs.index(y)] = raw
        b = Builder(ctx, self.name, output, "PTQD: ε̃ = ε̂/(1 + k_t), k_t the least-squares correlation of the "
                                            "quantization noise with the float output at timestep t")
        timestep = next(i for i in ctx.graph.inputs if i.name == self.config.timestep_input)
        factor = b.op("Gather", [table, timestep_index(b, timestep, np.arange(table.size), raw)], np.float32,
                      attrs={"axis": 0})
        rank = len(y.shape) if y.shape else 4
        factor = b.op("Reshape", [factor, np.array([-1] + [1] * (rank - 1), np.int64)], np.float32)
        b.op("Mul", [raw, factor], np.float32, outputs=[y])
        ctx.graph.cleanup().toposort()


def apply_ptqd(float_model, quant_model, calibration, output, config: PtqdConfig = PtqdConfig()) -> dict:
    """PTQD on an already quantized model (the pass as ``--ptqd`` runs it after lowering): writes
    ``output`` atomically with the correction and the ``qcompile.ptqd`` metadata; returns the estimates.

    ``float_model``/``quant_model``: paths; ``calibration``: what ``qcompile --calib`` takes."""
    import os
    from pathlib import Path

    import onnx

    from qcompiler.calibration.readers import load_calibration
    from qcompiler.context import QuantSettings
    from qcompiler.graph import set_metadata

    quantized = onnx.load(str(quant_model))
    ctx = CompileContext(quantized, QuantSettings(), load_calibration(calibration, quantized), source=str(float_model))
    pass_ = Ptqd(config)
    pass_.requires(ctx)
    pass_.call(ctx)
    model = ctx.model()
    set_metadata(model, ctx.metadata)
    output = Path(output)
    staging = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    onnx.save(model, str(staging))
    os.replace(staging, output)
    return json.loads(ctx.metadata[METADATA_KEY])
