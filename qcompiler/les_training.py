"""DMQ LES training machinery: calibration samples with their timesteps, the per-group problem, Adam on log γ.

``learned_scales`` (the pass) picks the scale groups and folds the γ this module learns; the loss,
the quantizers, the timestep weighting and the guard are documented in that module's docstring.
``pow2_skip_scales`` reuses the sample selection and the input collector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext
from qcompiler.errors import QCompileError
from qcompiler.folding import ScaleGroup
from qcompiler.scale_search import matmul_weights
from qcompiler.patterns import Conv, match_conv, weight_array

if TYPE_CHECKING:
    from qcompiler.passes.learned_scales import LearnedScalesConfig

TIMESTEP_KEY = "__timestep__"


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
                   tensors_per_run: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each tensor's values over ``batches`` (concatenated on the leading axis) and the sample of each row.

    The sample index of a leading-axis row is ``offset + i // k`` when the tensor's leading axis
    is k × the batch's rows (k = 1: one row per sample); None when it is not a multiple.
    """
    from qcompiler.calibration.capture import stream_tensors
    from qcompiler.calibration.statistics import StatsConfig

    offsets, offset = {}, 0
    for batch in batches:
        offsets[id(batch)] = offset
        offset += batch.batch_size
    parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray | None]]] = {name: {} for name in names}
    config = StatsConfig(tensors_per_run=tensors_per_run, progress=False, threads=ctx.threads)
    for batch, values in stream_tensors(ctx.skeleton(), batches, names, config, desc="LES inputs"):
        start, rows = offsets[id(batch)], batch.batch_size
        for name, value in values.items():
            value = np.asarray(value, np.float32)
            lead = value.shape[0] if value.ndim else 0
            rows_of = start + np.arange(lead) // (lead // rows) if lead and lead % rows == 0 else None
            parts[name][start] = (value, rows_of)
        del values
    out = {}
    for name in names:
        ordered = [parts[name][start] for start in sorted(parts[name])]
        index = None if any(rows_of is None for _, rows_of in ordered) else np.concatenate([r for _, r in ordered])
        out[name] = (np.concatenate([value for value, _ in ordered]), index)
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
                 settings, clip_ratios: tuple[float, ...] = (1.0,), relative: bool = False,
                 output_weights: list[np.ndarray | None] | None = None):
        self.torch, self.group = torch, group  # output_weights: v_o per consumer (qcompiler.downstream) or None
        self.output_weights = [None if w is None else torch.from_numpy(np.asarray(w, np.float32))
                               for w in (output_weights or [None] * len(group.consumers))]
        self.clip_ratios = tuple(clip_ratios)
        self.relative = relative
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

    def _fake_quant_weight(self, weight, block, clip_ratios=None):
        return fake_quant_weight(self.torch, weight, self.wbits, self.conv, block, clip_ratios or self.clip_ratios)

    def references(self, index):
        with self.torch.no_grad():
            x = self.x[index]
            return [self._apply(x, weight, spec) for weight, spec, _ in self.consumers]

    def losses(self, gamma, index, references=None, clip_ratios=None):
        """ℓ_n per item of ``index`` (summed over consumers), with gradients to γ; ``clip_ratios``:
        the weight quantizer's clip search (default: the training one, ``self.clip_ratios``)."""
        x = self.x[index]
        references = references if references is not None else self.references(index)
        axis = 1 if self.conv else -1
        x_hat = self._fake_quant_activation(x / self._gamma_shape(gamma, x.ndim, axis), gamma)
        total = 0.0
        for (weight, spec, block), reference, out_w in zip(self.consumers, references, self.output_weights):
            in_axis = 1 if self.conv else 0
            w_hat = self._fake_quant_weight(weight * self._gamma_shape(gamma, weight.ndim, in_axis), block, clip_ratios)
            squared = (self._apply(x_hat, w_hat, spec) - reference) ** 2
            energy = reference ** 2
            if out_w is not None:  # Σ_o v_o·(Y_o − Ŷ_o)²: the channels the next layers weigh most count most
                v = self._gamma_shape(out_w, reference.ndim, 1 if self.conv else -1)
                squared, energy = squared * v, energy * v
            error = squared.reshape(reference.shape[0], -1).mean(dim=1)
            if self.relative:  # per sample ‖Y − Ŷ‖²/‖Y‖²: every timestep's sample weighs alike
                error = error / energy.reshape(reference.shape[0], -1).mean(dim=1).clamp(min=1e-12)
            total = total + error
        return total

    def pool_losses(self, gamma, chunk: int = 16, items: np.ndarray | None = None, clip_ratios=None) -> np.ndarray:
        """ℓ_n for every item of ``items`` (default: all), no gradients, in chunks."""
        torch = self.torch
        items = np.arange(self.items) if items is None else np.asarray(items)
        out = []
        with torch.no_grad():
            for start in range(0, len(items), chunk):
                index = torch.from_numpy(items[start:start + chunk].astype(np.int64))
                out.append(self.losses(gamma, index, clip_ratios=clip_ratios).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _scale_rows(torch, weight, conv: bool, block: int | None):
    """(G, M) view of a weight: one row per quantization scale (output channel, or K-block of a column)."""
    if conv:  # (O, C, kh, kw): per output channel
        return weight.reshape(weight.shape[0], -1)
    if block is None:  # (K, N): per output column
        return weight.t()
    padded = torch.nn.functional.pad(weight, (0, 0, 0, (-weight.shape[0]) % block))
    return padded.reshape(-1, block, weight.shape[1]).permute(0, 2, 1).reshape(-1, block)


def _from_scale_rows(rows, weight, conv: bool, block: int | None):
    if conv:
        return rows.reshape(weight.shape)
    if block is None:
        return rows.t()
    return rows.reshape(-1, weight.shape[1], block).permute(0, 2, 1).reshape(-1, weight.shape[1])[:weight.shape[0]]


def fake_quant_weight(torch, weight, bits: int, conv: bool, block: int | None, clip_ratios=(1.0,)):
    """Symmetric fake quantization with a straight-through round, s = r·max|W|/qmax per scale.

    Scales: per output channel (``conv``: axis 0 of (O, C, kh, kw); else column of (K, N)) or per
    ``block`` rows of a column (MatMulNBits). r = the ratio of ``clip_ratios`` with the least squared
    weight error, chosen without gradient (first wins ties), as ``quantize_weights.clip_search`` does.
    """
    qmax = 2 ** (bits - 1) - 1
    rows = _scale_rows(torch, weight, conv, block)
    absmax = rows.abs().amax(dim=1, keepdim=True)
    ratio = torch.full_like(absmax, clip_ratios[0])
    if len(clip_ratios) > 1:
        with torch.no_grad():
            best = None
            for candidate in clip_ratios:
                s = torch.clamp(absmax * candidate / qmax, min=1e-12)
                error = ((torch.clamp(torch.round(rows / s), -qmax, qmax) * s - rows) ** 2).sum(dim=1, keepdim=True)
                if best is not None:
                    ratio = torch.where(error < best, torch.full_like(ratio, candidate), ratio)
                best = error if best is None else torch.minimum(best, error)
    scale = torch.clamp(absmax * ratio / qmax, min=1e-12)
    scaled = rows / scale
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return _from_scale_rows(torch.clamp(rounded, -qmax, qmax) * scale, weight, conv, block)


def holdout_items(item_samples: np.ndarray | None, items: int, held_samples: np.ndarray,
                  every: int) -> np.ndarray:
    """Items (leading rows of a group input) whose sample is held out; without a row → sample map,
    every ``every``-th item (interleaved, so the held-out items span the calibration order)."""
    if every < 2:
        return np.zeros(0, np.int64)
    if item_samples is not None and len(item_samples) == items:
        return np.flatnonzero(np.isin(item_samples, held_samples))
    return np.arange(every - 1, items, every)


def learn_gamma(torch, problem: GroupProblem, gamma0: np.ndarray, config: LearnedScalesConfig,
                item_timesteps: np.ndarray | None, desc: str = "", progress: bool = False,
                held_out: np.ndarray | None = None) -> dict:
    """Adam on θ = log γ with cosine-decayed lr; returns γ (after the guard) and what happened.

    ``held_out``: items (leading rows of the group input) kept out of training. Then every
    ``config.check_every`` steps the mean held-out loss is measured, the best θ so far is kept
    (early stopping: training ends after ``config.patience`` checks without a new best), and the
    guard picks among learned / init / γ = 1 by held-out error, so γ is never accepted when it
    raises the held-out error over the unscaled layer. Without held-out items (None or all
    items) training and the guard use every item.
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    theta = torch.tensor(np.log(gamma0), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    steps = config.iterations
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    train, judge, held = _split_items(problem.items, held_out)
    initial = problem.pool_losses(torch.exp(theta.detach()), items=train)
    weighting = None
    if config.timestep_weighting != "off" and item_timesteps is not None:
        power = config.power if config.timestep_weighting == "adaptive" else 1.0
        weighting = TimestepWeights(item_timesteps[train], initial, config.momentum, power)
    judge_ratios = config.guard_clip_ratios  # the lowering's weight quantizer (None: the training one)

    def judged(gamma) -> float:
        return float(problem.pool_losses(gamma, items=judge, clip_ratios=judge_ratios).mean())

    initial_judged = (float(initial.mean()) if held is None and judge_ratios is None
                      else judged(torch.exp(theta.detach())))
    best = {"error": initial_judged, "theta": theta.detach().clone(), "step": 0}
    stale = 0
    batch = min(config.batch_size, len(train))
    train_index = torch.from_numpy(train.astype(np.int64))
    for step in tqdm(range(1, steps + 1), desc=desc, unit="it", leave=False, disable=None if progress else True):
        pick = torch.randperm(len(train), generator=generator)[:batch]
        index = train_index[pick]
        losses = problem.losses(torch.exp(theta), index)
        if weighting is not None:
            slots = weighting.slot[pick.numpy()]
            weighting.update(slots, losses.detach().numpy())
            weights = torch.from_numpy(weighting.weights()[slots].astype(np.float32))
            loss = (weights * losses).mean()
        else:
            loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if held is not None and (step % config.check_every == 0 or step == steps):
            error = judged(torch.exp(theta.detach()))
            if error < best["error"]:
                best, stale = {"error": error, "theta": theta.detach().clone(), "step": step}, 0
            else:
                stale += 1
                if config.patience and stale >= config.patience:
                    break
    final = theta.detach() if held is None else best["theta"]
    learned = torch.exp(final).double().numpy()
    errors = {"init": initial_judged, "learned": judged(torch.from_numpy(learned.astype(np.float32)))}
    errors["ones"] = errors["init"] if np.all(gamma0 == 1.0) else judged(torch.ones(len(gamma0)))
    kept = _guard(errors, config.min_gain)
    candidates = {"learned": learned, "init": gamma0, "ones": np.ones_like(gamma0)}
    return {"gamma": candidates[kept], "kept": kept, "errors": errors, "judged_on": "held-out" if held is not None else "all",
            "best_step": best["step"] if held is not None else steps,
            "weights": None if weighting is None else dict(zip(weighting.values.tolist(),
                                                               weighting.weights().round(4).tolist()))}


def _split_items(items: int, held_out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(training items, judged items, held-out items or None): no or only held-out items → all, None."""
    everything = np.arange(items)
    held = np.zeros(0, np.int64) if held_out is None else np.unique(np.asarray(held_out, np.int64))
    if len(held) == 0 or len(held) == items:
        return everything, everything, None
    return np.setdiff1d(everything, held), held, held


def _guard(errors: dict[str, float], min_gain: float) -> str:
    """The candidate with the least judged error; γ = 1 unless the winner gains ≥ ``min_gain`` over it."""
    kept = min(("learned", "init", "ones"), key=lambda key: errors[key])
    if kept != "ones" and errors[kept] > (1.0 - min_gain) * errors["ones"]:
        return "ones"  # a small simulated gain: not worth redistributing the layer's error (min_gain)
    return kept
