"""Pass ``mixed_precision``: keep the weights the output is most sensitive to at 8 bits, within a byte budget.

Decision (no graph change; ``quantize_weights`` reads ``ctx.weight_bits``):

- sensitivity of GEMM l: S_l = Σ_b ‖f(x_b; Ŵ_l) − f(x_b; W)‖² / Σ_b ‖f(x_b; W)‖², the model's outputs
  with that weight alone on its ``--wbits`` grid (Ŵ_l exactly as ``quantize_weights`` will write it:
  int4 blocks or per-channel, MSE clip search when the recipe uses it; rounded to nearest even
  under ``quantize_weights.gptq``, whose Hessians come later) and every other weight and
  every activation float, on the first ``rows`` samples of ``batches`` calibration batches spread
  evenly over the calibration data (for a timestep-tagged folder: over the sampling trajectory).
  One ORT session with the weights as graph inputs; one forward pass per GEMM and batch. Cost on
  the zoo UNet (136 weights, 4 × 8 samples): 544 forward passes of 8 samples, about 3 min on one
  idle core; every row of 32-sample batches would cost 4×.
- bytes: a weight of P values at b bits counts P·b/8 (values only; scales excluded), so keeping l at
  8 bits costs P_l·(8 − b)/8 more. Budget: B_8 / B_total ≤ ``w8_budget``, B_8 the bytes of the W8
  weights, B_total the bytes of all quantized weights after the choice.
- choice (``order="per_byte"``, default): greedy knapsack by S_l / P_l, the sensitivity removed per
  byte spent, descending; a weight that does not fit is skipped and the next one tried. Ties break
  by node name, so the order is deterministic. ``order="sensitivity"``: by S_l alone (one large,
  sensitive weight may then use the whole budget). Per byte is the default because under a byte
  budget it maximizes Σ S_l removed when the errors add (the usual knapsack bound); the first
  and last Convs of a UNet are tiny and sensitive, exactly what it picks first.

``sensitivity_cache``: a JSON file the sensitivities are written to and read back from when its key
(SHA-256 of the weights, their grid, the bits and the calibration rows measured) matches, so a
sweep over budgets measures once.

With ``w8_budget = 0`` the pass measures nothing and changes nothing. The error bound of the
result is ``quantize_weights``' (|W − Ŵ| ≤ s_w/2 per element, at each weight's own bits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from qcompiler.calibration.readers import spread_batches
from qcompiler.context import CompileContext
from qcompiler.errors import PassError
from qcompiler.pass_manager import Pass, PassResult
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig, simulated_weight
from qcompiler.patterns import Conv, Linear, find_convs, find_linears, weight_array

log = logging.getLogger(__name__)

ORDERS = ("per_byte", "sensitivity")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    #: Largest share of the quantized weight bytes that may stay at 8 bits, in [0, 1).
    w8_budget: float = 0.0
    #: Calibration batches the sensitivities are measured on (evenly spaced over the data) ...
    batches: int = 4
    #: ... and the samples taken from each (its first ``rows``; 0: all).
    rows: int = 8
    #: "per_byte": greedy by sensitivity per byte; "sensitivity": by sensitivity alone.
    order: str = "per_byte"
    #: A JSON file caching the sensitivities by a key of everything they depend on ("": no cache).
    sensitivity_cache: str = ""
    #: The grid ``quantize_weights`` will use (the recipe's config; ``recipes.with_mixed_precision`` copies it).
    weights: QuantizeWeightsConfig = field(default_factory=QuantizeWeightsConfig)

    def __post_init__(self):
        if not 0 <= self.w8_budget < 1:
            raise ValueError(f"w8_budget must be in [0, 1), got {self.w8_budget}")
        if self.batches < 1 or self.rows < 0:
            raise ValueError(f"batches must be at least 1 and rows at least 0, got {self.batches}, {self.rows}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")


@dataclass(frozen=True)
class LayerCost:
    node: str
    params: int
    sensitivity: float


def candidate_units(ctx: CompileContext, config: QuantizeWeightsConfig) -> list[Linear | Conv]:
    """The GEMMs ``quantize_weights`` will quantize, in graph order."""
    units: list[Linear | Conv] = []
    if config.include_linear:
        units += find_linears(ctx.graph)
    if config.include_conv:
        units += find_convs(ctx.graph)
    return [u for u in units if u.node.name not in config.exclude_nodes and u.node.name not in ctx.dynamic_group_plans]


def first_rows(feeds: dict[str, np.ndarray], batch_size: int, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` samples of a batch: every feed with the batch's leading axis is cut, others kept."""
    if rows <= 0 or rows >= batch_size:
        return feeds
    return {name: value[:rows] if np.ndim(value) >= 1 and np.shape(value)[0] == batch_size else value
            for name, value in feeds.items()}


def _weights_as_inputs(ctx: CompileContext, units: list[Linear | Conv]) -> tuple[gs.Graph, dict[str, np.ndarray]]:
    """A copy of the graph whose unit weights are float graph inputs, and those weights by name."""
    graph = ctx.graph.copy()
    tensors = graph.tensors()
    floats: dict[str, np.ndarray] = {}
    for unit in units:
        name = unit.weight.name
        if name in floats:
            continue  # a weight two GEMMs share
        floats[name] = np.ascontiguousarray(weight_array(unit))  # its own dtype (float16 models stay float16)
        constant = tensors[name]
        variable = gs.Variable(name, dtype=floats[name].dtype, shape=list(floats[name].shape))
        for reader in list(constant.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is constant:
                    reader.inputs[index] = variable
        graph.inputs.append(variable)
    return graph, floats


def layer_sensitivities(ctx: CompileContext, units: list[Linear | Conv], config: MixedPrecisionConfig) -> list[LayerCost]:
    """S_l per unit (module docstring), sorted by descending sensitivity then node name."""
    from qcompiler.graph import to_skeleton
    from qcompiler.runtimes.ort import make_session, run

    graph, floats = _weights_as_inputs(ctx, units)
    session = make_session(to_skeleton(graph, ctx.template), lean=True, threads=ctx.threads)
    batches = [first_rows(b.feeds, b.batch_size, config.rows) for b in spread_batches(ctx.calibration, config.batches)]
    references = [run(session, {**feeds, **floats}) for feeds in batches]
    energy = sum(float(np.sum(np.square(y, dtype=np.float64))) for ref in references for y in ref.values())
    bits, block = ctx.settings.wbits, ctx.settings.block_size
    costs = []
    for unit in tqdm(units, desc="weight sensitivity", unit="weight", leave=False, disable=None):
        name = unit.weight.name
        w_hat = simulated_weight(unit, floats[name].astype(np.float32), bits, block, config.weights)
        feeds = {**floats, name: np.ascontiguousarray(w_hat.reshape(floats[name].shape), dtype=floats[name].dtype)}
        error = 0.0
        for batch, reference in zip(batches, references):
            got = run(session, {**batch, **feeds})
            error += sum(float(np.sum(np.square(got[k] - v, dtype=np.float64))) for k, v in reference.items())
        costs.append(LayerCost(unit.node.name, int(floats[name].size), error / max(energy, 1e-30)))
        log.debug("mixed_precision: %s S=%.3g", unit.node.name, costs[-1].sensitivity)
    return sorted(costs, key=lambda c: (-c.sensitivity, c.node))


def choose_w8(costs: list[LayerCost], low_bits: int, budget: float, order: str = "per_byte") -> list[LayerCost]:
    """The layers kept at 8 bits: greedy in ``order``, each added while B_8 / B_total ≤ ``budget``."""
    key = (lambda c: (-c.sensitivity / c.params, c.node)) if order == "per_byte" else (lambda c: (-c.sensitivity, c.node))
    total_low = sum(c.params for c in costs) * low_bits / 8
    kept, bytes_8, total = [], 0.0, total_low
    for cost in sorted(costs, key=key):
        extra = cost.params * (8 - low_bits) / 8
        if cost.sensitivity > 0 and (bytes_8 + cost.params) <= budget * (total + extra):
            kept.append(cost)
            bytes_8, total = bytes_8 + cost.params, total + extra
    return kept


def cache_key(ctx: CompileContext, units: list[Linear | Conv], config: MixedPrecisionConfig) -> str:
    """SHA-256 of what S_l depends on: each weight, its grid and bits, and the calibration rows measured."""
    weights = config.weights  # only what Ŵ_l depends on (simulated_weight): not GPTQ's settings, for example
    grid = (weights.clip_search, weights.clip_ratios, weights.clip_search_max_bits)
    digest = hashlib.sha256(repr((ctx.settings.wbits, ctx.settings.block_size, grid, config.batches,
                                  config.rows)).encode())
    for unit in units:
        digest.update(unit.node.name.encode())
        digest.update(np.ascontiguousarray(weight_array(unit), dtype=np.float32).tobytes())
    for batch in spread_batches(ctx.calibration, config.batches):
        for name, value in sorted(first_rows(batch.feeds, batch.batch_size, config.rows).items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def cached_sensitivities(ctx: CompileContext, units: list[Linear | Conv], config: MixedPrecisionConfig) -> list[LayerCost]:
    """``layer_sensitivities``, read from ``config.sensitivity_cache`` when its key matches, else measured and written."""
    if not config.sensitivity_cache:
        return layer_sensitivities(ctx, units, config)
    path, key = Path(config.sensitivity_cache), cache_key(ctx, units, config)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("key") == key:
            log.info("mixed_precision: sensitivities from %s", path)
            return sorted((LayerCost(**layer) for layer in cached["layers"]), key=lambda c: (-c.sensitivity, c.node))
    costs = layer_sensitivities(ctx, units, config)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"key": key, "layers": [asdict(c) for c in costs]}, indent=1))
    os.replace(staging, path)
    return costs


class MixedPrecision(Pass):
    """Sensitivity-guided W8/W``wbits`` choice per weight under a byte budget; see the module docstring."""

    name = "mixed_precision"
    Config = MixedPrecisionConfig

    def requires(self, ctx: CompileContext) -> None:
        if self.config.w8_budget > 0:
            self.require_calibration(ctx, "to measure each weight's output sensitivity")
            if ctx.settings.wbits >= 8:
                raise PassError(f"{ctx.source}: pass '{self.name}' (--w8-budget) keeps weights at 8 bits out of a "
                                f"narrower --wbits; this compile is already W{ctx.settings.wbits} (pass --wbits 4)")

    def call(self, ctx: CompileContext) -> PassResult:
        if self.config.w8_budget == 0:
            return PassResult(False, ("budget 0%: every weight at the compile's width",))
        units = candidate_units(ctx, self.config.weights)
        costs = cached_sensitivities(ctx, units, self.config)
        low = ctx.settings.wbits
        kept = choose_w8(costs, low, self.config.w8_budget, self.config.order)
        for cost in kept:
            ctx.weight_bits[cost.node] = 8
        kept_names = {c.node for c in kept}
        bytes_8 = sum(c.params for c in kept)
        total = bytes_8 + sum(c.params for c in costs if c.node not in kept_names) * low / 8
        ctx.mixed_precision = {
            "w8_budget": self.config.w8_budget, "order": self.config.order, "low_bits": low,
            "batches": len(spread_batches(ctx.calibration, self.config.batches)), "rows": self.config.rows,
            "sensitivity": f"relative squared output error with that weight alone at W{low}, all else float",
            "weight_bytes": {"w8": int(bytes_8), "total": int(round(total)),
                             "all_low": int(round(sum(c.params for c in costs) * low / 8)),
                             "all_8": int(sum(c.params for c in costs))},
            "w8_share": bytes_8 / total if total else 0.0,
            "kept_at_8": [{"node": c.node, "params": c.params, "sensitivity": c.sensitivity} for c in kept],
            "layers": [{"node": c.node, "params": c.params, "sensitivity": c.sensitivity,
                        "bits": 8 if c.node in kept_names else low} for c in costs],
        }
        note = (f"kept {len(kept)} of {len(costs)} weights at W8 ({100 * bytes_8 / total if total else 0:.1f}% of "
                f"{int(round(total)):,} weight bytes, budget {100 * self.config.w8_budget:g}%)")
        return PassResult(bool(kept), (note,))
