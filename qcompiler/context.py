"""The compile context that flows through the pass manager: graph, calibration, settings, records."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.graph import NameScope, to_graph, to_model, to_skeleton
from qcompiler.grids import DynamicGroupPlan, GroupPlan, OutputGrid, WeightRule
from qcompiler.skeleton import fresh_map

#: Arrays below this size stay in memory when a pass asks to ``spill`` them.
SPILL_BYTES = 1 << 20


@dataclass(frozen=True)
class QuantSettings:
    """Bit widths and weight options shared by the quantizing passes of a recipe."""

    wbits: int = 8
    abits: int = 8
    block_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        if self.wbits not in (8, 6, 4):  # 6: int6 values in int8 containers (int8 kernels), as abits < 8
            raise ValueError(f"wbits must be 8, 6 or 4, got {self.wbits}")
        if self.abits not in (8, 6, 4):
            raise ValueError(f"abits must be 8, 6 or 4, got {self.abits}")
        if self.block_size not in (32, 64, 128):
            raise ValueError(f"block_size must be 32, 64 or 128, got {self.block_size}")


@dataclass
class QuantRecord:
    """One quantized tensor or node, for the report: what spec it got and how it is lowered."""

    node: str
    tensor: str
    role: str  # "weight" | "activation"
    spec: str
    lowering: str
    pass_name: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"node": self.node, "tensor": self.tensor, "role": self.role, "spec": self.spec,
                "lowering": self.lowering, "pass": self.pass_name, **self.details}


def _key(name: str, axis: int | None) -> tuple[str, int]:
    """Cache key of a tensor's statistics along a channel axis: None (the last axis) is -1."""
    return name, -1 if axis is None else axis


class CompileContext:
    """Everything a pass may read or change. Passes mutate ``graph`` and append ``records``."""

    def __init__(self, model: onnx.ModelProto, settings: QuantSettings, calibration=None,
                 source: str = "model", graph: gs.Graph | None = None):
        #: The input model's proto: inputs, opsets, metadata. From ``graph.load_graph`` it holds no
        #: weight data; the weights live only in ``graph``'s constants.
        self.template = model
        self.graph: gs.Graph = graph if graph is not None else to_graph(model)
        self.settings = settings
        self.calibration = calibration or []
        self.source = source
        self.records: list[QuantRecord] = []
        self.fallbacks: list[str] = []
        #: Tensors a fold rescales on purpose (a producer writes (X − z)/s): not comparable to float.
        self.rescaled_tensors: set[str] = set()
        # Decisions the quantizing passes hand to the target's lowering stage (qcompiler/grids.py).
        #: DGQ group plans by tensor name (``dgq_groups``); None until that pass has run.
        self.group_plans: dict[str, GroupPlan] | None = None
        #: Q-DiT group-wise GEMMs by Linear node name (``qdit_groups``); their weights stay float until lowering.
        self.dynamic_group_plans: dict[str, DynamicGroupPlan] = {}
        #: Per-tensor grids of quantized Conv outputs (``insert_activation_qdq``), by tensor name.
        self.output_grids: dict[str, OutputGrid] = {}
        #: How each GEMM's weight grid was chosen (``quantize_weights``), by GEMM node name.
        self.weight_rules: dict[str, WeightRule] = {}
        #: Weight bits of GEMMs that differ from ``settings.wbits`` (``mixed_precision``), by GEMM node
        #: name; ``quantize_weights`` reads it.
        self.weight_bits: dict[str, int] = {}
        #: What ``mixed_precision`` measured and kept (for the report); None when it did not run.
        self.mixed_precision: dict | None = None
        #: What the target's lowering of a DGQ channel affine costs at run time, for grid choices:
        #: ``affine_ops(tensor, shared_zero_point)`` -> elementwise ops it adds for that tensor (0 where
        #: a producer absorbs the affine). Set by the compile from its target; None: passes assume
        #: 1 op with a shared zero point, 2 without.
        self.affine_ops: Callable[[gs.Tensor, bool], int] | None = None
        #: Extra ``metadata_props`` entries a pass writes into the output model (e.g. ``qcompile.ptqd``).
        self.metadata: dict[str, str] = {}
        #: Statistics by ``_key(tensor, channel axis)``.
        self._stats_cache: dict[tuple[str, int], Any] = {}
        #: Cache keys whose ranges were derived across a fold (``fold_statistics``): no per-position ranges.
        self._derived: set[tuple[str, int]] = set()
        self._names: NameScope | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        #: ORT intra-op threads of calibration sessions (None: ORT's default). Outputs do not depend
        #: on it (min/max are exact; tests/test_determinism.py), so it is not written to the model.
        self.threads: int | None = None
        #: A ``calibration.distributed.CalibrationCluster`` when calibration runs on a dask cluster
        #: (``--cluster``/``--workers``): statistics and row samples are then computed shard by shard
        #: on its workers and merged exactly (bitwise equal to this process computing them).
        self.cluster = None

    @property
    def names(self) -> NameScope:
        if self._names is None:
            self._names = NameScope(self.graph)
        return self._names

    def model(self) -> onnx.ModelProto:
        """The current graph as one self-contained ONNX model (a copy of every weight: small models)."""
        return to_model(self.graph, self.template)

    def skeleton(self):
        """The current graph as a ``Skeleton`` (weights by reference): for sessions and saving at any size."""
        return to_skeleton(self.graph, self.template)

    def invalidate_statistics(self) -> None:
        """Called when a pass changes values in a way ``fold_statistics`` cannot follow: cached
        statistics no longer hold."""
        self._stats_cache.clear()
        self._derived.clear()
        self._names = None

    def fold_statistics(self, changed: set[str], source: str, target: str, axis: int, rank: int | None,
                        scale: np.ndarray, shift: np.ndarray | None) -> None:
        """Keep the cache valid across an equivalence fold that makes ``target`` hold (X − z)/s of
        ``source``'s X along channel ``axis`` (negative; ``rank`` when known) and changes the
        values of ``changed`` tensors (everything else computes what it did: the fold is exact).

        Cached ranges of X along that axis give the ranges of X' directly (``TensorStats.folded``);
        the other changed tensors are dropped and recaptured if a pass asks for them again."""
        entries = [(key, self._stats_cache[key]) for key in self._stats_cache if key[0] == source]
        for key in [key for key in self._stats_cache if key[0] in changed or key[0] == target]:
            del self._stats_cache[key]
            self._derived.discard(key)
        for (_, key_axis), stats in entries:
            same_axis = key_axis == axis or (rank is not None and key_axis % rank == axis % rank)
            if same_axis and stats.channel_min.size == np.size(scale):
                self._stats_cache[(target, key_axis)] = stats.folded(target, shift, scale)
                self._derived.add((target, key_axis))
        self._names = None

    def statistics(self, tensors: Mapping[str, int | None], progress: bool = True, batches=None,
                   rows=None, per_index: bool = True) -> dict:
        """Calibration statistics of ``tensors`` (name -> channel axis) on the current graph, cached.

        ``batches``: a subset of the calibration data (e.g. the fit rows of a hold-out split)
        instead of all of it; those statistics are computed fresh and not cached. ``rows``: a
        ``row_samples.RowSampler`` (in-process only) that draws its rows in the same forward
        passes when the statistics need one; ``rows.done`` says whether it ran. ``per_index``:
        the caller reads per-position ranges, which ranges derived across a fold lack (they are
        then recaptured); False where channel and tensor ranges are all it reads."""
        if batches is not None:
            return self._collect(dict(tensors), batches, progress)
        wanted = {name: axis for name, axis in tensors.items() if _key(name, axis) not in self._stats_cache
                  or (per_index and _key(name, axis) in self._derived)}
        if wanted:
            wanted = {**self._quantization_points(), **wanted}
            fresh = self._collect(wanted, self.calibration, progress, rows)
            for name, axis in wanted.items():
                self._stats_cache[_key(name, axis)] = fresh[name]
                self._derived.discard(_key(name, axis))
        return {name: self._stats_cache[_key(name, axis)] for name, axis in tensors.items()}

    def _quantization_points(self) -> dict[str, int | None]:
        """Every integer-weight GEMM's input (channel axis 1 for Conv, else the last) and every such
        Conv's output (axis 1) not cached yet: what activation quantization asks for later. Before
        the weights are quantized, the same for every Linear and Conv with a constant weight (the
        ones ``quantize_weights`` will take). A calibration pass costs about the same with them (the
        reductions are small next to the forward pass), so the statistics a later pass needs are
        already cached; a fold keeps them valid (``fold_statistics``)."""
        from qcompiler.grids import quantized_gemms
        from qcompiler.patterns import find_convs, find_linears

        points: dict[str, int | None] = {}
        gemms = quantized_gemms(self.graph) + [unit.node for unit in find_linears(self.graph) + find_convs(self.graph)]
        for node in gemms:
            source = node.inputs[0]
            if isinstance(source, gs.Variable):
                points.setdefault(source.name, 1 if node.op == "Conv" else None)
            if node.op == "Conv":
                points[node.outputs[0].name] = 1
        return {name: axis for name, axis in points.items() if _key(name, axis) not in self._stats_cache}

    def statistics_of_parts(self, tensors: Mapping[str, int | None], parts, progress: bool = True,
                            rows=None) -> list[dict]:
        """Statistics of ``tensors`` on each part of a partition of the calibration rows (e.g. a
        hold-out split's fit and held-out rows): one pass over the data in all. The whole set's
        statistics, merged from the parts (exact: ranges and counts do not depend on order), go
        into the cache that ``statistics`` serves. ``parts`` must cover every calibration row once.

        ``rows``: a ``row_samples.RowSampler`` (in-process only) that draws its rows in the last
        part's forward passes (e.g. held-out rows: no capture pass of their own); it learns the
        tensors' sizes per sample from the first part's statistics (``RowSampler.expect``)."""
        import copy

        tensors = {**self._quantization_points(), **tensors}
        results = []
        for index, part in enumerate(parts):
            sampler = rows if index == len(parts) - 1 else None
            if sampler is not None and results:
                sampler.expect(results[0])
            results.append(self._collect(dict(tensors), part, progress, sampler))
        for name, axis in tensors.items():
            merged = copy.deepcopy(results[0][name])
            for result in results[1:]:
                merged.merge(result[name], source=self.source)
            self._stats_cache[_key(name, axis)] = merged
            self._derived.discard(_key(name, axis))
        return results

    def _collect(self, tensors: dict, batches, progress: bool, rows=None) -> dict:
        from qcompiler.calibration.statistics import StatsConfig, collect_statistics

        if not batches:
            from qcompiler.errors import QCompileError
            raise QCompileError(f"{self.source}: this recipe needs calibration data; pass --calib DIR")
        # The passes read ranges only: reduced inside ORT, every tensor in one pass per batch.
        config = StatsConfig(progress=progress, ranges_only=True, threads=self.threads)
        if self.cluster is not None:
            fresh = self.cluster.statistics(self.skeleton(), batches, tensors, config)
        else:
            fresh = collect_statistics(self.skeleton(), batches, tensors, config, rows)
        self.release_weight_pages()
        return fresh

    def release_weight_pages(self) -> int:
        """After ORT read every weight (a calibration forward pass): a fresh map of each memory-mapped
        constant, so the pages read leave the resident set once the session is gone (they stay in
        the OS page cache). Without it a 2.4 GB model's weights stay resident through the searches
        that follow. Returns how many constants were re-mapped."""
        count = 0
        for tensor in self.graph.tensors().values():
            # _values: reading .values would load a still-lazy embedded constant.
            if isinstance(tensor, gs.Constant) and isinstance(getattr(tensor, "_values", None), np.memmap):
                tensor.values = fresh_map(tensor._values)
                count += 1
        return count

    def spill(self, array: np.ndarray, force: bool = False) -> np.ndarray:
        """A large in-memory array written to a scratch file and memory-mapped back (read-only).

        For float weights a pass keeps only for a later lowering (a folded W' that the DGQ affine
        re-quantizes): the pages leave the resident set and come back only if read. Small arrays
        and arrays already mapped from a file are returned as they are (``force``: any in-memory
        array is spilled). ``close`` removes the files.
        """
        if isinstance(array, np.memmap) or (array.nbytes < SPILL_BYTES and not force):
            return array
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="qcompile-scratch-")
        path = Path(self._scratch.name) / f"{len(os.listdir(self._scratch.name))}.npy"
        np.save(path, np.ascontiguousarray(array))
        return np.load(path, mmap_mode="r")

    def close(self) -> None:
        """Remove scratch files (``spill``; the context's arrays mapped from them must not be read after)
        and end the calibration cluster's client."""
        if self.cluster is not None:
            self.cluster.close()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def constant(self, name: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(name, np.ascontiguousarray(value))
