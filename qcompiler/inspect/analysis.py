"""`qcompile inspect` as a library call: two passes over the calibration data, then the whole report.

Pass 1 folds every watched activation into a ``TensorStats`` (min/max per channel and per
position, mean|h|, |h| histogram) and the attention probabilities into ``AttentionMass``.
The outlier threshold τ·mean|h| is known only after it, so pass 2 runs the same chunks again
and counts |h| > τ·mean|h| per channel, position and token exactly (``OutlierCounts``). Both
passes run ORT with the watched tensors as extra outputs, ``tensors_per_run`` at a time, and
drop each batch's outputs before the next: memory does not grow with the calibration set.
Both passes request the same chunks in the same order, so a deterministic runtime returns
bitwise-equal values; each tensor's max|h| is compared between the passes to show it did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

# The engine's chunked runner: a private copy of the model whose outputs are set per chunk
# (external data above 2 GiB handled). Reused rather than copied; collect_statistics reduces
# inside the loop, and inspect needs the raw values twice.
from qcompiler.calibration.capture import stream_tensors
from qcompiler.calibration.readers import CalibrationBatch, load_calibration
from qcompiler.calibration.statistics import StatsConfig, TensorStats
from qcompiler.errors import QCompileError
from qcompiler.graph import load_graph, to_graph, to_skeleton
from qcompiler.inspect import activations, attention, recommend, weights
from qcompiler.inspect.targets import Targets, find_targets


@dataclass(frozen=True)
class InspectConfig:
    """What counts as an outlier, what the advice aims for, and how the passes run.

    ``tau``: activation/weight outlier factor (|h| > τ·mean|h|); ``attention_fraction``: an
    attention outlier key draws ≥ this·L_q; ``abits``/``wbits``/``groups``/``max_loss_bits``:
    the quantization the advice assumes and its target (``recommend``); ``min_recurrence``:
    tensors a channel must be an outlier in to be systematic; ``token_input``: the integer
    (batch, tokens) input whose ids outliers are counted by (None: none).
    """

    tau: float = 64.0
    attention_fraction: float = 0.1
    abits: int = 8
    wbits: int = 8
    groups: int = 8
    max_loss_bits: float = 1.5
    min_recurrence: int = 2
    token_input: str | None = "input_ids"
    calib_limit: int | None = None
    tensors_per_run: int = 32
    threads: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.tau <= 0 or not 0 < self.attention_fraction <= 1:
            raise QCompileError(f"inspect: tau ({self.tau}) must be > 0 and attention_fraction "
                                f"({self.attention_fraction}) in (0, 1]")
        if not (2 <= self.abits <= 16 and 2 <= self.wbits <= 16) or self.groups < 1:
            raise QCompileError(f"inspect: abits ({self.abits}) and wbits ({self.wbits}) must be in [2, 16], "
                                f"groups ({self.groups}) ≥ 1")


@dataclass
class InspectResult:
    """The JSON-ready report plus the running statistics that the plots read (histograms)."""

    report: dict
    stats: dict[str, TensorStats] = field(repr=False)
    counts: dict[str, activations.OutlierCounts] = field(repr=False)


def stream(model: onnx.ModelProto, batches: Sequence[CalibrationBatch], tensors: Sequence[str],
           config: StatsConfig, desc: str) -> Iterator[tuple[CalibrationBatch, dict[str, np.ndarray]]]:
    """``(batch, {tensor: value})`` per chunk and batch; the caller drops the dict before the next."""
    return stream_tensors(model, batches, tensors, config, desc)


def _token_ids(batch: CalibrationBatch, name: str | None) -> np.ndarray | None:
    value = batch.feeds.get(name) if name else None
    return value if value is not None and value.ndim == 2 and value.dtype.kind in "iu" else None


def _first_pass(model, batches, targets: Targets, config: InspectConfig, stats_config: StatsConfig):
    """TensorStats per activation and AttentionMass per Softmax output, over every batch."""
    axes = {a.tensor: a.channel_axis for a in targets.activations}
    stats: dict[str, TensorStats] = {}
    masses = {site.tensor: attention.AttentionMass(site.tensor, site.kind, config.attention_fraction)
              for site in targets.attention}

    def fold(batch: CalibrationBatch, values: dict[str, np.ndarray]) -> None:
        # A function, so no loop variable keeps an activation alive into the next ORT run.
        for name, value in values.items():
            if name in masses:
                masses[name].update(value, _token_ids(batch, config.token_input))
                continue
            if name not in stats:
                stats[name] = TensorStats.start(name, value, axes[name], stats_config.histogram_bins, True)
            stats[name].update(value, batch.source)

    for batch, values in stream(model, batches, targets.tensors(), stats_config, "inspect 1/2: statistics"):
        fold(batch, values)
        del values
    return stats, masses


def _second_pass(model, batches, targets: Targets, stats, config: InspectConfig, stats_config: StatsConfig):
    """OutlierCounts per activation with the threshold τ·mean|h| from pass 1."""
    counts = {name: activations.OutlierCounts.start(s, config.tau * s.mean_abs()) for name, s in stats.items()}

    def fold(batch: CalibrationBatch, values: dict[str, np.ndarray]) -> None:
        ids = _token_ids(batch, config.token_input)
        for name, value in values.items():
            if name in counts:  # attention probabilities ride along only to keep the chunks equal
                counts[name].update(value, ids)

    for batch, values in stream(model, batches, targets.tensors(), stats_config, "inspect 2/2: outlier counts"):
        fold(batch, values)
        del values
    return counts


def _consumers(targets: Targets, tensor: str, channels: int) -> recommend.Consumers:
    """ω_j, max|W| per input channel and max_k|W_ojk| per layer, over every Linear/Conv reading ``tensor``."""
    layers = [layer for layer in targets.layers if layer.input == tensor]
    if not layers or any(layer.groups != 1 or layer.weight.shape[1] != channels for layer in layers):
        return recommend.Consumers(np.ones(channels), None)
    omega = sum(np.square(layer.weight, dtype=np.float64).sum(axis=(0, 2)) for layer in layers)
    return recommend.Consumers(omega, np.max([layer.column_absmax for layer in layers], axis=0),
                               tuple((np.abs(layer.weight).max(axis=2), layer.weight.shape[2]) for layer in layers))


def inspect_model(model: onnx.ModelProto | str | os.PathLike, calibration,
                  config: InspectConfig = InspectConfig()) -> InspectResult:
    """Outliers, weight ratios, attention mass, DGQ view and advice for ``model`` on ``calibration``."""
    clock = [time.perf_counter()]
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = now - clock[-1]
        clock.append(now)

    source = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    # A path's weights are memory-mapped; both passes run ORT on the skeleton (no copy, any size).
    proto, graph = (model, to_graph(model)) if isinstance(model, onnx.ModelProto) else load_graph(model)
    targets = find_targets(graph)
    skeleton = to_skeleton(graph, proto)
    if not targets.activations:
        raise QCompileError(f"{source}: found no Linear/Conv inputs, norm outputs or residual sums to inspect")
    batches = load_calibration(calibration, proto, limit=config.calib_limit)
    stats_config = StatsConfig(tensors_per_run=config.tensors_per_run, threads=config.threads,
                               progress=config.progress)
    lap("setup")
    stats, masses = _first_pass(skeleton, batches, targets, config, stats_config)
    lap("pass1")
    counts = _second_pass(skeleton, batches, targets, stats, config, stats_config)
    lap("pass2")
    report = _assemble(source, targets, stats, counts, masses, batches, config)
    lap("analysis")
    report["timing_s"] = {**timings, "total": clock[-1] - clock[0]}
    return InspectResult(report, stats, counts)


def _assemble(source, targets: Targets, stats, counts, masses, batches, config: InspectConfig) -> dict:
    summaries = [activations.summarize(a, stats[a.tensor], counts[a.tensor], config.tau) for a in targets.activations]
    systematic = activations.systematic_channels(summaries, config.min_recurrence)
    by_width: dict[int, set[int]] = {}
    for item in systematic:
        by_width.setdefault(item["width"], set()).add(item["channel"])
    outlier_channels = {s["tensor"]: {c for c, _ in s["outliers"]["channels"]} for s in summaries}
    weight_rows = [weights.analyse(layer, config.tau, outlier_channels.get(layer.input, set()), by_width)
                   for layer in targets.layers]
    attention_rows = [attention.summarize(site, masses[site.tensor]) for site in targets.attention]
    advice = []
    for summary in summaries:
        if "gemm_input" not in summary["roles"]:
            continue
        name = summary["tensor"]
        consumers = _consumers(targets, name, summary["channels"])
        sqnr = recommend.predict(stats[name], counts[name], consumers, config.abits, config.wbits, config.groups)
        advice.append(recommend.recommend(summary, sqnr, config.abits, config.max_loss_bits))
    diffusion = any("__timestep__" in batch.metadata for batch in batches)
    return {
        "qcompile_version": __import__("qcompiler").__version__, "model": source,
        "calibration": {"batches": len(batches), "samples": sum(b.batch_size for b in batches),
                        "timestep_tagged": diffusion},
        "config": asdict(config),
        "passes_agree": all(s["pass_check"]["equal"] for s in summaries),
        "activations": summaries, "systematic_channels": systematic, "weights": weight_rows,
        "attention": attention_rows, "recommendations": advice,
        "recipe": recommend.suggest_recipe(advice, attention_rows, diffusion),
    }
