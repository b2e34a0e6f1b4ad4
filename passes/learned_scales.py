"""Pass ``learned_scales`` (DMQ LES): learn a per-input-channel γ per GEMM on its calibration inputs, then fold it.

Rewrite, per scale group (an activation X and the Linears/Convs reading it; Q, K, V share one γ):
    X → X/γ ;  W → W·γ   (W[k, :]·γ_k along the input axis)              (folded by ``fold_scales.fold``)
γ = exp(θ) (always > 0), θ learned with torch (Adam, lr ``lr``, cosine decay to 0, ``iterations`` steps)
on the group's recorded calibration inputs X_n (n = one batch row of the model input = one sample):
    Ŷ_n = Q_a(X_n/γ) ⊛ Q_w(W·γ)          Y_n = X_n ⊛ W          (⊛: MatMul or the Conv; bias cancels)
    ℓ_n = mean((Y_n − Ŷ_n)²)  summed over the group's consumers
    Q_a: asymmetric per tensor, ``abits``: s = (hi − lo)/(2^b − 1), z = round(−lo/s), with
         [lo, hi] = [min_c(min_c X/γ_c), max_c(max_c X/γ_c)] ∪ {0} recomputed from γ at every step
         (min_c, max_c: per-channel ranges over the WHOLE calibration set, the range that
         ``insert_activation_qdq`` will calibrate after the fold, so training and lowering agree);
    Q_w: symmetric per output channel, ``wbits`` (int4 blocks along K for a W4 MatMul, its
         MatMulNBits lowering); s_w = max|W·γ|/(2^(b−1) − 1).
    Both round with a straight-through estimator (round(x) = x + stopgrad(round(x) − x)); the
    scales are functions of γ and pass gradients.
Adaptive timestep weighting (DESIGN §5.2, optional): each sample carries its timestep t (the
calibration's ``__timestep__``). L_t = EMA(momentum 0.95) of the mean loss of samples at t
(initialised by one pass over the pool at the initial γ), w_t = (1 − L_t/Σ_t L_t)^r (r = 20;
``"linear"``: r = 1), loss = mean_n(w_{t_n}·ℓ_n) over the mini-batch. Timesteps whose loss is
small (the noisy early steps, where the error starts to accumulate) get the larger weights.
Row → timestep: a group input's leading axis is the model's batch axis; when it is a multiple
k of the batch rows (e.g. (B·T, C)) row i belongs to sample i // k; otherwise (or when the
calibration has no ``__timestep__``) the group is trained unweighted and the notes say so.

Guard: after training, the unweighted pool error of the learned γ, of the initial γ and of γ = 1
are compared and the lowest wins (recorded as ``kept``), so the pass never makes a layer's
simulated quantized output error worse than plain per-tensor quantization on the samples.

Exact before quantization: X·W = (X/γ)·(γ·W); the producer (Norm affine, a Linear/Conv's output
channels, the V projection) or an explicit Mul (after SiLU/GELU; listed in ``ctx.fallbacks``)
writes X/γ. Groups with one input channel are skipped (a per-tensor quantizer is scale-invariant),
and so are Conv readers that are not 2-D (the torch model uses conv2d).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext
from qcompiler.errors import PassError, QCompileError
from qcompiler.graph import add_outputs
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.passes.fold_scales import ScaleGroup, find_absorber, find_scale_groups, fold
from qcompiler.passes.shift_scale import matmul_weights
from qcompiler.passes.smooth_scales import smooth_scale, weight_row_absmax
from qcompiler.patterns import Conv, match_conv, weight_array

TIMESTEP_KEY = "__timestep__"


@dataclass(frozen=True)
class LearnedScalesConfig:
    #: Adam steps per group (the paper: 6,000 at lr 1e-3); see benchmarks/results/dmq.md for the trade-off.
    iterations: int = 100
    #: 1e-2, not the paper's 1e-3: with 60× fewer steps, θ = log γ must move further per step (measured
    #: on UNet layers: 200 steps at 1e-2 reach a lower error than at 1e-3, close to 800 steps).
    lr: float = 1e-2
    #: "ones" (γ = 1, DESIGN §5.2) or "smoothquant" (γ = max|X|^α / max|W|^(1−α)).
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
    #: Also learn γ for groups that no producer can absorb (an explicit Mul at run time).
    allow_explicit: bool = True
    exclude_nodes: tuple[str, ...] = ()
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
        if not 0.0 <= self.momentum < 1.0 or self.power <= 0:
            raise ValueError(f"LearnedScalesConfig: 0 ≤ momentum < 1 and power > 0 required, got {self}")


def import_torch(pass_name: str):
    """torch, or a QCompileError saying how to install it (it is in the [export]/[dev] extras)."""
    try:
        import torch
    except ImportError:
        raise QCompileError(f"pass '{pass_name}' needs PyTorch (CPU): pip install torch==2.13.0, or install "
                            "qcompile with the [export] or [dev] extra") from None
    return torch


# --------------------------------------------------------------------------------------------------
# Calibration samples: whole batch rows (a Conv needs its spatial neighbourhood), with their timesteps.

def select_samples(calibration: list[CalibrationBatch], count: int, seed: int = 0) -> list[CalibrationBatch]:
    """Up to ``count`` batch rows spread evenly over the calibration batches (= timesteps for ``collect``).

    Fewer wanted rows than batches: one row from each of ``count`` evenly spaced batches; else every
    batch gives ⌊count/len⌋ rows and ``count mod len`` evenly spaced batches one more (random rows,
    seeded), so every timestep is covered. Metadata with the batch axis is sliced along.
    """
    rng = np.random.default_rng(seed)
    if not calibration:
        return []
    total = len(calibration)
    if count < total:
        per = {int(i): 1 for i in np.linspace(0, total - 1, count).round().astype(int)}
    else:
        spread = np.linspace(0, total - 1, count % total).round().astype(int) if count % total else []
        extra = {int(i) for i in spread}
        per = {index: count // total + (index in extra) for index in range(total)}
    selected = []
    for index, rows in per.items():
        batch = calibration[index]
        take = min(rows, batch.batch_size)
        keep = np.sort(rng.choice(batch.batch_size, size=take, replace=False))
        selected.append(_rows(batch, keep))
    return selected


def _rows(batch: CalibrationBatch, rows: np.ndarray) -> CalibrationBatch:
    size = batch.batch_size

    def cut(value: np.ndarray) -> np.ndarray:
        return value[rows] if value.ndim >= 1 and value.shape[0] == size else value

    return CalibrationBatch({k: cut(v) for k, v in batch.feeds.items()},
                            {k: cut(v) for k, v in batch.metadata.items()}, f"{batch.source}[rows]")


def sample_timesteps(batches: list[CalibrationBatch]) -> np.ndarray | None:
    """The timestep of every selected sample (row), or None when a batch has no ``__timestep__``."""
    parts = []
    for batch in batches:
        value = batch.metadata.get(TIMESTEP_KEY)
        if value is None or np.ndim(value) != 1 or len(value) != batch.batch_size:
            return None
        parts.append(np.asarray(value).astype(np.int64))
    return np.concatenate(parts) if parts else None


def collect_inputs(ctx: CompileContext, batches: list[CalibrationBatch], names: list[str],
                   tensors_per_run: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each tensor's values over ``batches`` (concatenated on the leading axis) and the sample of each row.

    The sample index of a leading-axis row is ``offset + i // k`` when the tensor's leading axis
    is k × the batch's rows (k = 1: one row per sample); None when it is not a multiple.
    """
    from qcompiler.runtimes.ort import make_session, run

    inputs = {value.name for value in ctx.graph.inputs}
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    computed = [name for name in names if name not in inputs]
    model = ctx.model() if computed else None
    chunks = [computed[i:i + tensors_per_run] for i in range(0, len(computed), tensors_per_run)]
    for chunk in chunks + [[name for name in names if name in inputs]]:
        if not chunk:
            continue
        session = make_session(add_outputs(model, chunk)) if any(n not in inputs for n in chunk) else None
        parts: dict[str, list] = {name: [] for name in chunk}
        index: dict[str, list | None] = {name: [] for name in chunk}
        offset = 0
        for batch in batches:
            values = run(session, batch.feeds, chunk) if session is not None else {}
            rows = batch.batch_size
            for name in chunk:
                value = np.asarray(values[name] if name in values else batch.feeds[name], np.float32)
                parts[name].append(value)
                lead = value.shape[0] if value.ndim else 0
                if index[name] is not None and lead and lead % rows == 0:
                    index[name].append(offset + np.arange(lead) // (lead // rows))
                else:
                    index[name] = None
            offset += rows
        for name in chunk:
            out[name] = (np.concatenate(parts[name]), np.concatenate(index[name]) if index[name] else None)
    return out


# --------------------------------------------------------------------------------------------------
# Timestep weights.

class TimestepWeights:
    """w_t = (1 − L_t/Σ_t L_t)^power with L_t an EMA (``momentum``) of the mean loss of samples at t."""

    def __init__(self, timesteps: np.ndarray, initial_losses: np.ndarray, momentum: float = 0.95,
                 power: float = 20.0):
        self.values, self.slot = np.unique(timesteps, return_inverse=True)
        self.momentum, self.power = momentum, power
        self.ema = np.array([initial_losses[self.slot == k].mean() for k in range(len(self.values))], np.float64)

    def update(self, slots: np.ndarray, losses: np.ndarray) -> None:
        """L_t ← m·L_t + (1 − m)·mean(ℓ_n for the mini-batch samples n at t)."""
        for k in np.unique(slots):
            self.ema[k] = self.momentum * self.ema[k] + (1 - self.momentum) * float(losses[slots == k].mean())

    def weights(self) -> np.ndarray:
        """w_t per timestep slot (order of ``values``)."""
        return timestep_weights(self.ema, self.power)


def timestep_weights(losses: np.ndarray, power: float = 20.0) -> np.ndarray:
    """w_t = (1 − L_t/Σ_t L_t)^power; all ones when every L_t is 0."""
    losses = np.asarray(losses, np.float64)
    total = losses.sum()
    if total <= 0:
        return np.ones_like(losses)
    return np.clip(1.0 - losses / total, 0.0, 1.0) ** power


# --------------------------------------------------------------------------------------------------
# The per-group problem in torch.

class GroupProblem:
    """The torch model of one scale group: float references and the fake-quantized forward for a γ."""

    def __init__(self, torch, group: ScaleGroup, x: np.ndarray, channel_min: np.ndarray, channel_max: np.ndarray,
                 settings):
        self.torch, self.group = torch, group
        self.conv = isinstance(group.consumers[0], Conv)
        if self.conv:
            self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        else:  # (items, rows, C): a leading item axis, everything else flattened to rows
            self.x = torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1, x.shape[-1]), np.float32))
        self.low = torch.from_numpy(np.asarray(channel_min, np.float32))
        self.high = torch.from_numpy(np.asarray(channel_max, np.float32))
        self.abits = settings.abits
        self.consumers = []
        for unit in group.consumers:
            if self.conv:
                unit = match_conv(unit.node)
                weight = torch.from_numpy(weight_array(unit).astype(np.float32))  # (O, C, kh, kw)
                attrs = unit.node.attrs
                pads = list(attrs.get("pads", [0, 0, 0, 0]))
                spec = {"stride": tuple(attrs.get("strides", [1, 1])),
                        "dilation": tuple(attrs.get("dilations", [1, 1])),
                        "pads": (pads[1], pads[3], pads[0], pads[2]) if pads else (0, 0, 0, 0)}
                block = None
            else:
                weight = torch.from_numpy(matmul_weights(unit))  # (K, N)
                spec = None
                block = settings.block_size if settings.wbits == 4 and unit.node.op == "MatMul" else None
            self.consumers.append((weight, spec, block))
        self.wbits = settings.wbits

    @property
    def items(self) -> int:
        return int(self.x.shape[0])

    def _apply(self, x, weight, spec):
        functional = self.torch.nn.functional
        if not self.conv:
            return x @ weight
        if any(spec["pads"]):
            x = functional.pad(x, spec["pads"])
        return functional.conv2d(x, weight, stride=spec["stride"], dilation=spec["dilation"])

    def _gamma_shape(self, gamma, ndim: int, axis: int):
        shape = [1] * ndim
        shape[axis] = gamma.numel()
        return gamma.reshape(shape)

    def _fake_quant_activation(self, x, gamma):
        torch = self.torch
        low = torch.clamp(torch.min(self.low / gamma), max=0.0)
        high = torch.clamp(torch.max(self.high / gamma), min=0.0)
        qmax = 2 ** self.abits - 1
        scale = torch.clamp((high - low) / qmax, min=1e-12)
        zero = torch.clamp(torch.round(-low / scale), 0, qmax).detach()
        scaled = x / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()
        return (torch.clamp(rounded + zero, 0, qmax) - zero) * scale

    def _fake_quant_weight(self, weight, block):
        torch = self.torch
        qmax = 2 ** (self.wbits - 1) - 1
        if self.conv:  # per output channel (axis 0)
            absmax = weight.abs().amax(dim=tuple(range(1, weight.ndim)), keepdim=True)
        elif block is None:  # (K, N): per output column
            absmax = weight.abs().amax(dim=0, keepdim=True)
        else:  # blocks of `block` along K per column (MatMulNBits)
            k = weight.shape[0]
            pad = (-k) % block
            padded = torch.nn.functional.pad(weight, (0, 0, 0, pad))
            blocks = padded.reshape(-1, block, weight.shape[1]).abs().amax(dim=1, keepdim=True)
            absmax = blocks.expand(-1, block, -1).reshape(-1, weight.shape[1])[:k]
        scale = torch.clamp(absmax / qmax, min=1e-12)
        scaled = weight / scale
        rounded = scaled + (torch.round(scaled) - scaled).detach()
        return torch.clamp(rounded, -qmax, qmax) * scale

    def references(self, index):
        with self.torch.no_grad():
            x = self.x[index]
            return [self._apply(x, weight, spec) for weight, spec, _ in self.consumers]

    def losses(self, gamma, index, references=None):
        """ℓ_n per item of ``index`` (summed over consumers), with gradients to γ."""
        x = self.x[index]
        references = references if references is not None else self.references(index)
        axis = 1 if self.conv else -1
        x_hat = self._fake_quant_activation(x / self._gamma_shape(gamma, x.ndim, axis), gamma)
        total = 0.0
        for (weight, spec, block), reference in zip(self.consumers, references):
            in_axis = 1 if self.conv else 0
            w_hat = self._fake_quant_weight(weight * self._gamma_shape(gamma, weight.ndim, in_axis), block)
            error = (self._apply(x_hat, w_hat, spec) - reference) ** 2
            total = total + error.reshape(error.shape[0], -1).mean(dim=1)
        return total

    def pool_losses(self, gamma, chunk: int = 16) -> np.ndarray:
        """ℓ_n for every item (no gradients), in chunks."""
        torch = self.torch
        out = []
        with torch.no_grad():
            for start in range(0, self.items, chunk):
                index = torch.arange(start, min(start + chunk, self.items))
                out.append(self.losses(gamma, index).numpy())
        return np.concatenate(out).astype(np.float64)


def learn_gamma(torch, problem: GroupProblem, gamma0: np.ndarray, config: LearnedScalesConfig,
                item_timesteps: np.ndarray | None, desc: str = "", progress: bool = False) -> dict:
    """Adam on θ = log γ with cosine-decayed lr; returns γ (after the guard) and what happened."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    theta = torch.tensor(np.log(gamma0), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    steps = config.iterations
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    weighting = None
    initial = problem.pool_losses(torch.exp(theta.detach()))
    if config.timestep_weighting != "off" and item_timesteps is not None:
        power = config.power if config.timestep_weighting == "adaptive" else 1.0
        weighting = TimestepWeights(item_timesteps, initial, config.momentum, power)
    batch = min(config.batch_size, problem.items)
    for _ in tqdm(range(steps), desc=desc, unit="it", leave=False, disable=None if progress else True):
        index = torch.randperm(problem.items, generator=generator)[:batch]
        losses = problem.losses(torch.exp(theta), index)
        if weighting is not None:
            slots = weighting.slot[index.numpy()]
            weighting.update(slots, losses.detach().numpy())
            weights = torch.from_numpy(weighting.weights()[slots].astype(np.float32))
            loss = (weights * losses).mean()
        else:
            loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    learned = torch.exp(theta.detach()).double().numpy()
    candidates = {"learned": learned, "init": gamma0, "ones": np.ones_like(gamma0)}
    errors = {"init": float(initial.mean())}
    errors["learned"] = float(problem.pool_losses(torch.from_numpy(learned.astype(np.float32))).mean())
    errors["ones"] = (errors["init"] if np.all(gamma0 == 1.0)
                      else float(problem.pool_losses(torch.ones(len(gamma0))).mean()))
    kept = min(("learned", "init", "ones"), key=lambda key: errors[key])
    return {"gamma": candidates[kept], "kept": kept, "errors": errors,
            "weights": None if weighting is None else dict(zip(weighting.values.tolist(),
                                                               weighting.weights().round(4).tolist()))}


class LearnedScales(Pass):
    """X → X/γ ; W → W·γ with γ = exp(θ) learned per scale group on its quantized output error (DMQ LES).

    See the module docstring for the loss, the quantizers, the timestep weighting and the guard.
    Exact before quantization (the fold re-associates X·W); quantization happens in later passes.
    """

    name = "learned_scales"
    Config = LearnedScalesConfig
    exact = True

    def requires(self, ctx: CompileContext) -> None:
        if not ctx.calibration:
            raise PassError(f"pass '{self.name}' needs calibration data (the layers' inputs); pass --calib DIR")
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
        notes = []
        if config.timestep_weighting != "off" and timesteps is None:
            notes.append("timestep weighting off: the calibration has no __timestep__ (not a diffusion collection)")
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        kinds: dict[str, int] = {}
        kept: dict[str, int] = {}
        ratios, unmapped = [], 0
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
                    problem = GroupProblem(torch, group, x, *stats[group.name], ctx.settings)
                    gamma0 = self._initial(group, stats[group.name])
                    result = learn_gamma(torch, problem, gamma0, config, item_timesteps,
                                         desc=f"{self.name} {number}/{len(ordered)}", progress=config.progress)
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
            notes.append(f"simulated output error vs γ = 1: median ×{np.median(ratios):.3f}, "
                         f"best ×{np.min(ratios):.3f}; kept {kept}")
        if config.timestep_weighting != "off" and timesteps is not None:
            notes.append(f"timestep weighting '{config.timestep_weighting}' over {len(np.unique(timesteps))} timesteps"
                         + (f"; {unmapped} groups unweighted (rows not a multiple of the batch)" if unmapped else ""))
        return PassResult(bool(kinds), tuple(notes))

    def _initial(self, group: ScaleGroup, ranges) -> np.ndarray:
        if self.config.init == "ones":
            return np.ones(group.channels)
        absmax = np.maximum(np.abs(ranges[0]), np.abs(ranges[1]))
        return smooth_scale(absmax, weight_row_absmax_any(group), self.config.alpha)


def weight_row_absmax_any(group: ScaleGroup) -> np.ndarray:
    """max |W_j·| per input channel j over the group's consumers (Linear [K, N] or Conv [O, C, kh, kw])."""
    if not isinstance(group.consumers[0], Conv):
        return weight_row_absmax(group)
    rows = [np.abs(weight_array(match_conv(u.node))).max(axis=(0, 2, 3)) for u in group.consumers]
    return np.max(rows, axis=0)
