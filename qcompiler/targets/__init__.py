"""Targets: the lowering stage that turns the passes' grid decisions into the ops a runtime runs.

A target implements ``Target``: ``lower(ctx)`` rewrites the graph (it may read ``ctx.group_plans``,
``ctx.output_grids``, ``ctx.weight_rules`` and the QDQ nodes the passes inserted), ``count_kernels``
asks the runtime's optimized graph which GEMMs run on integer kernels, and ``Config`` is a frozen
dataclass of its options. Passes never import a target; a new target is one module here plus an
entry in ``TARGETS`` (docs/architecture.md says which files a new target touches).
"""

from __future__ import annotations

import os
from typing import ClassVar

from qcompiler.context import CompileContext
from qcompiler.errors import QCompileError
from qcompiler.lowering.constant_sharing import share_constants
from qcompiler.pass_manager import Pass, PassResult


class Target:
    """Base class of a lowering target."""

    name: ClassVar[str] = "target"
    Config: ClassVar[type]

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def check_model(self, model, source: str) -> None:
        """Raise QCompileError naming a node of the input model that this target cannot run at all
        (checked before any work); the default accepts every model."""

    def check_recipe(self, recipe) -> None:
        """Raise QCompileError naming the pass of ``recipe`` whose own lowering this target cannot run
        (checked before any work); the default accepts every recipe."""

    def affine_ops(self, ctx: CompileContext, tensor, shared_zero_point: bool) -> int:
        """Elementwise ops this target adds at run time to run DGQ channel groups of ``tensor`` as one
        per-tensor grid (0 where a producer absorbs the affine). Passes read it as ``ctx.affine_ops``
        to make each op pay for itself in held-out error; the default assumes a scale, plus a shift
        without a shared zero point."""
        return 1 if shared_zero_point else 2

    def lower(self, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def count_kernels(self, model_path: str | os.PathLike):  # pragma: no cover - abstract
        """A ``runtimes.ort.KernelCount``-like object: integer_gemms, float_gemms, op_types."""
        raise NotImplementedError


class LowerStage(Pass):
    """The pass manager's last step: ``target.lower(ctx)``, timed, verified and dumpable like a pass
    (``--dump-after lower``)."""

    name = "lower"

    def __init__(self, target: Target):
        super().__init__(None)
        self.target = target

    def call(self, ctx: CompileContext) -> PassResult:
        result = self.target.lower(ctx)
        shared = share_constants(ctx.graph)
        if not shared:
            return result
        ctx.graph.cleanup()
        return PassResult(True, result.notes + (f"{shared} duplicate constants shared (identical values, one copy)",))


def available_targets() -> dict[str, type[Target]]:
    from qcompiler.targets.ort import OrtTarget
    from qcompiler.targets.tensorrt import TensorRTTarget

    return {OrtTarget.name: OrtTarget, TensorRTTarget.name: TensorRTTarget}


def get_target(name: str, config=None) -> Target:
    targets = available_targets()
    if name not in targets:
        raise QCompileError(f"unknown target '{name}'; available: {', '.join(sorted(targets))}")
    return targets[name](config)
