"""The pass contract (requires -> call -> PassResult) and the manager that runs a recipe's passes.

A pass is a small class: ``name``, a frozen ``Config`` dataclass, ``requires(ctx)`` that raises
a clear error when its preconditions fail, and ``call(ctx) -> PassResult``. ``exact = True``
marks equivalence rewrites, which ``--verify`` holds to 1e-5 relative error against the float
model; quantizing passes are verified to be finite and their SQNR is recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from qcompiler.context import CompileContext
from qcompiler.errors import InternalError, PassError, QCompileError
from qcompiler.memory import trim_heap
from qcompiler.report import peak_rss_bytes
from qcompiler.skeleton import checkable, save_skeleton

#: Relative error an exact (equivalence) pass may introduce, measured by ORT on seeded inputs.
EXACT_RTOL = 1e-5


@dataclass(frozen=True)
class PassResult:
    modified: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmptyConfig:
    """A pass without settings."""


class Pass:
    """Base class. Subclasses set ``name``, ``Config`` and implement ``call`` (and ``requires``)."""

    name: ClassVar[str] = "pass"
    Config: ClassVar[type] = EmptyConfig
    exact: ClassVar[bool] = False

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def requires(self, ctx: CompileContext) -> None:
        """Raise PassError naming what is missing; the default needs nothing. Called for every pass
        before the first one runs, so it may only read what the compile starts with."""

    def call(self, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def require_calibration(self, ctx: CompileContext, purpose: str) -> None:
        """PassError unless the compile has calibration data; ``purpose`` says what the pass reads."""
        if not ctx.calibration:
            raise PassError(f"{ctx.source}: pass '{self.name}' needs calibration data {purpose}; pass --calib DIR "
                            "(a folder of .npz files whose keys are the model's input names)")


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    notes: tuple[str, ...] = ()
    verify: dict = field(default_factory=dict)
    #: The process's peak RSS so far when the pass ended (from the OS): the pass where it jumps made the peak.
    peak_rss_bytes: int | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 4), "modified": self.modified,
                "notes": list(self.notes), "verify": self.verify, "peak_rss_bytes": self.peak_rss_bytes}


@dataclass(frozen=True)
class ManagerOptions:
    verify: bool = False
    dump_after: tuple[str, ...] = ()
    dump_prefix: str | None = None  # "<dir>/<stem>" for "<stem>.after-<pass>.onnx"
    progress: bool = True


class PassManager:
    """Runs passes in order, times them, verifies and dumps on request; errors name the pass."""

    def __init__(self, passes: list[Pass], options: ManagerOptions = ManagerOptions()):
        self.passes = passes
        self.options = options
        unknown = set(options.dump_after) - {p.name for p in passes}
        if unknown:
            raise QCompileError(f"--dump-after: no pass named {sorted(unknown)} in this recipe; "
                                f"passes are {[p.name for p in passes]}")

    def run(self, ctx: CompileContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        # Pre-flight: every precondition (calibration present, inputs named) is checked before the
        # first pass runs, so a missing --calib is reported in a second, not after minutes of work.
        for pass_ in self.passes:
            pass_.requires(ctx)
        reference = self._reference_outputs(ctx) if self.options.verify else None
        for index, pass_ in enumerate(self.passes):
            if self.options.progress:
                print(f"[{index + 1}/{len(self.passes)}] {pass_.name} ...", flush=True)
            start = time.perf_counter()
            try:
                result = pass_.call(ctx)  # requires() already ran in the pre-flight above
            except QCompileError:
                raise
            except Exception as exc:  # a bug, not bad input: exit 1, traceback with --debug
                node = node_in_traceback(exc)
                where = f" on node '{node}'" if node else ""
                raise InternalError(f"internal error in pass '{pass_.name}'{where}: {type(exc).__name__}: {exc}",
                                    pass_.name, node) from exc
            trim_heap()  # what the pass freed leaves the resident set before the next one allocates
            record = PassRecord(pass_.name, time.perf_counter() - start, result.modified, result.notes,
                                peak_rss_bytes=peak_rss_bytes())
            if reference is not None:
                record.verify = self._verify(ctx, pass_, reference)
            if pass_.name in self.options.dump_after:
                path = Path(f"{self.options.dump_prefix}.after-{pass_.name}.onnx")
                save_skeleton(ctx.skeleton(), path)
                record.notes = record.notes + (f"dumped to {path}",)
            records.append(record)
        return records

    def _reference_outputs(self, ctx: CompileContext) -> list[dict]:
        from qcompiler.runtimes.ort import make_session, run

        session = make_session(ctx.skeleton(), lean=True)
        return [run(session, batch.feeds) for batch in verification_batches(ctx)]

    def _verify(self, ctx: CompileContext, pass_: Pass, reference: list[dict]) -> dict:
        """onnx.checker plus an ORT run against the float model's outputs on the same inputs."""
        from qcompiler.runtimes.ort import make_session, run

        skeleton = ctx.skeleton()  # weights by reference: no copy, any model size
        try:
            onnx.checker.check_model(checkable(skeleton.proto))
        except onnx.checker.ValidationError as exc:
            raise InternalError(f"internal error: pass '{pass_.name}' produced an invalid graph: "
                                f"{str(exc).splitlines()[0]}", pass_.name) from exc
        session = make_session(skeleton, lean=True)
        worst_rel, outputs = 0.0, {}
        for batch, expected in zip(verification_batches(ctx), reference):
            got = run(session, batch.feeds)
            for name, value in expected.items():
                if not np.all(np.isfinite(got[name])):
                    raise PassError(f"pass '{pass_.name}': output '{name}' has NaN/Inf after the pass")
                rel = float(np.max(np.abs(got[name] - value)) / (np.max(np.abs(value)) + 1e-30))
                worst_rel = max(worst_rel, rel)
                outputs[name] = max(outputs.get(name, 0.0), rel)
        if pass_.exact and worst_rel > EXACT_RTOL:
            raise InternalError(f"internal error: pass '{pass_.name}' is an equivalence rewrite but changed the "
                                f"outputs by {worst_rel:.2e} relative (> {EXACT_RTOL:g}); per output: {outputs}",
                                pass_.name)
        return {"max_relative_error": worst_rel, "per_output": outputs, "exact": pass_.exact}


#: Local variable names under which passes hold the graph element they are working on.
_FOCUS_NAMES = ("node", "unit", "group", "tensor", "consumer", "producer")


def node_in_traceback(exc: BaseException) -> str | None:
    """The name of the node (or tensor) a failing pass was working on: the innermost frame of the
    traceback that has a local ``node``/``unit``/``group``/… with a ``name``; None if none does."""
    import traceback

    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames):
        for key in _FOCUS_NAMES:
            value = frame.f_locals.get(key)
            name = getattr(getattr(value, "node", value), "name", None)
            if isinstance(name, str) and name:
                return name
    return None


def verification_batches(ctx: CompileContext, count: int = 2):
    """A few calibration batches, or seeded random inputs when there is no calibration data."""
    if ctx.calibration:
        return ctx.calibration[:count]
    from qcompiler.verify import random_batches

    return random_batches(ctx.template, count=count, seed=0)
