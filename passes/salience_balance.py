"""Pass ``salience_balance`` (PTQ4DiT): channel-wise salience balancing with Spearman-guided calibration.

Rewrite, per scale group (an activation X and the Linears reading it; Q, K, V share one B):
    s(W)_j = max_i |W_ji| over every consumer's row j                  (input channel j)
    s(X)^(t)_j = max |X_j| over the tokens of every calibration sample at timestep t
    ρ_t = Spearman(s(X)^(t), s(W))        η = softmax(−ρ) over timesteps        (SSC)
    s̃(X) = Σ_t η_t · s(X)^(t)
    B_j = sqrt(s̃(X)_j / (s(W)_j + 1e−8))                                (CSB)
    X' = X/B,   W'[j, :] = B_j·W[j, :]                   (folded by ``qcompiler.folding.fold``)
Timesteps where the activation's salient channels differ most from the weight's (low ρ) get the
most weight: there the outliers of X and W are complementary and balancing pays most. A unit t
is a timestep where the calibration files carry ``__timestep__`` (``qcompile collect``), else one
calibration batch. Channels that never fired (s̃ = 0) keep B = 1; B is clamped to ≥ 1e−5.
``spearman = False`` gives CSB alone: s̃(X) = max_t s(X)^(t) (SmoothQuant's α = 0.5 on these layers).

Which layers (``roles``), as in the paper: the GEMMs after an AdaLN modulation (``modulated``: qkv
and fc1 of a DiT block; B folds into the modulation Linear's scale/shift rows or PixArt's table)
and attention output projections (``attention_output``: B folds into V). ``other`` adds every
other Linear (fc2 after GELU, cross-attention, embeddings), which mostly needs an explicit Mul.
The paper leaves fc2 alone; so does the default. Where no producer can absorb 1/B the fold inserts
an explicit Mul, listed in ``ctx.fallbacks`` (the official code divides X at run time everywhere).

Exact before quantization: X·W = (X/B)·(B·W); the producer (or the explicit Mul) writes X/B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qcompiler.context import CompileContext
from qcompiler.folding import ScaleGroup, find_absorber, find_scale_groups, fold
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.passes.smooth_scales import weight_row_absmax

log = logging.getLogger(__name__)

ROLES = ("modulated", "attention_output", "other")
#: Lower clamp of B (as SmoothQuant's scale) and the ε added to s(W) (PTQ4DiT's formula).
MIN_BALANCE = 1e-5
WEIGHT_EPS = 1e-8


@dataclass(frozen=True)
class SalienceBalanceConfig:
    roles: tuple[str, ...] = ("modulated", "attention_output")
    #: Spearman-guided salience calibration (SSC); False: CSB alone with s̃(X) = max over timesteps.
    spearman: bool = True
    #: Calibration batches read for the saliences (None: all).
    batches: int | None = None
    progress: bool = True

    def __post_init__(self):
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(f"SalienceBalanceConfig: roles must be a non-empty subset of {ROLES}, got {self.roles}")
        if self.batches is not None and self.batches < 1:
            raise ValueError(f"SalienceBalanceConfig: batches must be ≥ 1, got {self.batches}")


def layer_role(graph, group: ScaleGroup) -> str:
    """``modulated`` (X written by an AdaLN modulation), ``attention_output`` (X = merged P·V) or ``other``."""
    absorber = find_absorber(graph, group)
    if absorber and absorber.kind == "AdaLN modulation":
        return "modulated"
    tensor = group.tensor
    for _ in range(8):  # back through head merge / float Cast to P·V
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None:
            break
        if node.op == "MatMul" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Softmax":
            return "attention_output"
        if node.op not in ("Reshape", "Transpose", "Cast"):
            break
        tensor = node.inputs[0]
    return "other"


def activation_salience(ctx: CompileContext, groups: list[ScaleGroup], batches, progress: bool
                        ) -> dict[str, dict[object, np.ndarray]]:
    """Per tensor, per unit (timestep, else batch index): max |X_j| over the unit's samples and tokens."""
    from qcompiler.calibration.capture import stream_tensors
    from qcompiler.calibration.statistics import StatsConfig

    names = list(dict.fromkeys(group.name for group in groups))
    index = {id(batch): number for number, batch in enumerate(batches)}
    salience: dict[str, dict[object, np.ndarray]] = {name: {} for name in names}
    config = StatsConfig(progress=progress, threads=ctx.threads)
    for batch, values in stream_tensors(ctx.skeleton(), batches, names, config, desc="salience"):
        timesteps = batch.metadata.get("__timestep__")
        for name, value in values.items():
            value = np.abs(np.asarray(value, np.float32))
            rows = value.reshape(value.shape[0], -1, value.shape[-1]).max(axis=1)  # (samples, C)
            if timesteps is not None and np.size(timesteps) == rows.shape[0]:
                labels = np.asarray(timesteps).reshape(-1)
            else:
                labels = np.full(rows.shape[0], index[id(batch)])
            for label in np.unique(labels):
                peak = rows[labels == label].max(axis=0)
                key = label.item()
                salience[name][key] = np.maximum(salience[name][key], peak) if key in salience[name] else peak
        del values
    return salience


def balance(units: np.ndarray, weight: np.ndarray, spearman: bool) -> tuple[np.ndarray, np.ndarray]:
    """(B, η) from per-unit activation saliences (T, C) and the weight salience (C,)."""
    from scipy.stats import spearmanr

    if spearman and units.shape[0] > 1:
        rho = np.array([spearmanr(unit, weight).statistic for unit in units], dtype=np.float64)
        rho = np.nan_to_num(rho, nan=0.0)  # a constant salience has no rank order: neutral weight
        eta = np.exp(-(rho - rho.min()))
        eta /= eta.sum()
        activation = eta @ units.astype(np.float64)
    else:
        eta = np.full(units.shape[0], 1.0 / units.shape[0])
        activation = units.max(axis=0).astype(np.float64)
    scale = np.sqrt(activation / (weight.astype(np.float64) + WEIGHT_EPS))
    return np.where(activation > 0, np.maximum(scale, MIN_BALANCE), 1.0), eta


class SalienceBalance(Pass):
    """X' = X/B, W' = B·W with B = sqrt(s̃(X)/s(W)), s̃(X) weighted over timesteps by softmax(−ρ) (PTQ4DiT).

    See the module docstring for the formulas and the layers. Exact before quantization.
    """

    name = "salience_balance"
    Config = SalienceBalanceConfig
    exact = True

    def requires(self, ctx: CompileContext) -> None:
        self.require_calibration(ctx, "for per-timestep activation saliences")

    def call(self, ctx: CompileContext) -> PassResult:
        groups = [(group, layer_role(ctx.graph, group)) for group in find_scale_groups(ctx.graph)]
        chosen = [(group, role) for group, role in groups if role in self.config.roles]
        if not chosen:
            return PassResult(False, (f"no Linear input in roles {self.config.roles}",))
        batches = ctx.calibration[: self.config.batches] if self.config.batches else ctx.calibration
        salience = activation_salience(ctx, [group for group, _ in chosen], batches, self.config.progress)
        kinds: dict[str, int] = {}
        roles: dict[str, int] = {}
        spread = []
        # Downstream groups first, so s(W) is read from weights whose output channels already carry
        # downstream factors (e.g. V divided for the out-projection): the weights that get quantized.
        for group, role in tqdm(list(reversed(chosen)), desc=self.name, unit="group", leave=False,
                                disable=None if self.config.progress else True):
            units = np.stack([salience[group.name][key] for key in sorted(salience[group.name])])
            scale, eta = balance(units, weight_row_absmax(group), self.config.spearman)
            kind = fold(ctx, group, scale, None, self.name).split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            roles[role] = roles.get(role, 0) + 1
            spread.append(float(eta.max() / eta.min()))
            log.info("%s: '%s' (%s) B in [%.3g, %.3g], η max/min %.2f over %d units", self.name, group.name, role,
                     scale.min(), scale.max(), spread[-1], len(eta))
        ctx.graph.cleanup().toposort()
        absorbed = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        balanced = ", ".join(f"{count} {role}" for role, count in sorted(roles.items()))
        skipped = len(groups) - len(chosen)
        notes = [f"{len(chosen)} groups balanced ({balanced}); {skipped} other Linear inputs left as they are",
                 f"absorbed by: {absorbed}"]
        if self.config.spearman:
            notes.append(f"SSC over {units.shape[0]} units: η max/min from {min(spread):.2f} to {max(spread):.2f}")
        return PassResult(True, tuple(notes))
