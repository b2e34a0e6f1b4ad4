"""Calibration on a dask.distributed cluster: shards of the calibration batches run on workers, results merge exactly.

The driver (the compile) writes the current graph once per capture to a folder every worker can
read (``ClusterConfig.shared_dir``; external data beside it), cuts the calibration batches into
consecutive shards and submits one task per shard. Each worker opens the model in its own ORT
session (``skeleton.open_skeleton``: the proto as written, weights memory-mapped) and returns:

- for statistics, partial ``TensorStats`` of its batches (``collect_statistics``: ranges reduced
  inside ORT, or the full capture where a tensor cannot be reduced there);
- for row samples (OS+, SmoothQuant's α search), the rows drawn from its batches with the seeded
  draw keyed by each batch's index in the whole data set (``row_samples.sample_rows``).

The driver merges statistics in shard order with ``TensorStats.merge`` (exact: min/max, integer
counts, power-of-two histogram ranges, sums kept as exact partials), so the merged statistics, and
the models built from them, equal a single-process run bit for bit, whatever the shard layout or the
order in which shards finish. Row samples are keyed by batch index and need no merging.

Failures: a task that raises is retried (``ClusterConfig.retries``); a task whose worker dies is
rescheduled by the scheduler on another worker. If a shard still fails the capture stops with one
line naming the shard and its files. The driver checks that every calibration sample was merged
(``samples`` of every tensor), and records the count per capture (``CalibrationCluster.runs``,
the report's ``calibration_cluster``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.errors import QCompileError, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    """Where calibration runs: an existing scheduler (``address``) or a local cluster of ``workers`` processes."""

    address: str | None = None
    workers: int | None = None
    #: A folder every worker can read, for the current graph (default: a temporary folder, which only
    #: workers on this machine can see: pass a shared file system's path with a remote scheduler).
    shared_dir: str | None = None
    #: Reruns of a shard whose task raised (a dead worker's shard is rescheduled by the scheduler).
    retries: int = 2
    #: Shards the batches are cut into (None: one per worker). More balance uneven workers and make a
    #: retry cheaper; fewer open fewer sessions. The result does not depend on it.
    shards: int | None = None
    connect_timeout: float = 20.0

    def __post_init__(self):
        if (self.address is None) == (self.workers is None):
            raise QCompileError("calibration cluster: give either a scheduler address (--cluster) or a number of "
                                "local workers (--workers), not both")
        if self.workers is not None and self.workers < 1:
            raise QCompileError(f"--workers must be at least 1, got {self.workers}")
        if self.retries < 0 or (self.shards is not None and self.shards < 1):
            raise QCompileError(f"calibration cluster: retries ≥ 0 and shards ≥ 1 are required, got {self}")


def shard_ranges(count: int, shards: int) -> list[range]:
    """``count`` batch indices cut into at most ``shards`` consecutive, near-equal runs."""
    shards = max(1, min(shards, count))
    bounds = [count * index // shards for index in range(shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(shards)]


@functools.lru_cache(maxsize=1)
def _open(path: str):
    """The shared model on this worker; kept while the driver's captures use the same file."""
    from qcompiler.skeleton import open_skeleton

    try:
        return open_skeleton(path)
    except FileNotFoundError as exc:
        raise QCompileError(f"{path}: not readable on this worker ({exc.strerror}); the shared folder must be "
                            "visible to every worker (--shared-dir)") from None


def shard_statistics(path: str, batches: list[CalibrationBatch], tensors: dict, config) -> dict:
    """Task: partial statistics of ``tensors`` over one shard's batches (``collect_statistics``)."""
    from qcompiler.calibration.statistics import collect_statistics

    return collect_statistics(_open(path), batches, tensors, config)


def shard_rows(path: str, batches: list[CalibrationBatch], first: int, tensors: dict, per_batch: int, seed: int,
               order: list[str], threads: int | None) -> dict:
    """Task: sample rows of ``tensors`` from one shard's batches, keyed by global batch index."""
    from qcompiler.calibration.row_samples import sample_rows

    return sample_rows(_open(path), batches, tensors, per_batch, seed, order, threads, first=first)


class CalibrationCluster:
    """A dask client for the compile's captures; ``close`` ends it (and a local cluster it started)."""

    def __init__(self, config: ClusterConfig, threads: int | None = None):
        require("distributed", "--cluster/--workers", "cluster")
        from distributed import Client, LocalCluster

        # dask logs its scheduler's and workers' life at INFO; qcompile's progress goes to stderr already.
        logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger("distributed").level))
        self.config = config
        self._local = None
        self._scratch = None
        if config.shared_dir is not None:  # checked before connecting: the cheap mistake first
            self.folder = Path(config.shared_dir)
            if not self.folder.is_dir() or not os.access(self.folder, os.W_OK):
                raise QCompileError(f"{self.folder}: --shared-dir must be an existing writable folder "
                                    "that every worker can read")
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="qcompile-cluster-")
            self.folder = Path(self._scratch.name)
        try:
            if config.workers is not None:
                # One ORT thread pool per worker, sized so the workers share the cores, not oversubscribe them.
                self.threads = threads or max(1, (os.cpu_count() or 1) // config.workers)
                self._local = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None, scheduler_kwargs={"dashboard": False},
                                           silence_logs=logging.CRITICAL)  # a failed shard: one line, below
                self.client = Client(self._local)
                self.address = self._local.scheduler_address
            else:
                self.threads = threads
                self.client = Client(config.address, timeout=config.connect_timeout)
                self.address = config.address
        except OSError as exc:
            self.close()
            where = config.address or "local cluster"
            raise QCompileError(f"calibration cluster {where}: could not connect ({str(exc).splitlines()[0][:200]}); "
                                "start a scheduler (`dask scheduler`) or use --workers N") from None
        self.workers = len(self.client.scheduler_info(n_workers=-1)["workers"]) if config.address else config.workers
        if not self.workers:
            self.close()
            raise QCompileError(f"calibration cluster {config.address}: the scheduler has no workers; "
                                f"start some with `dask worker {config.address}`")
        #: One record per capture: what ran, in how many shards, and how many samples were merged.
        self.runs: list[dict] = []
        #: Each worker process's peak RSS (since it started), asked for when the cluster closes.
        self.worker_peaks: dict[str, int] = {}
        log.info("calibration cluster %s: %d worker(s), shared folder %s", self.address, self.workers, self.folder)

    def summary(self) -> dict:
        return {"scheduler": self.address, "local": self.config.workers is not None, "workers": self.workers,
                "worker_peak_rss_bytes": self.worker_peaks, "captures": self.runs}

    def _write(self, skeleton) -> Path:
        """The current graph in the shared folder (external data beside it), a new name per capture."""
        from qcompiler.skeleton import save_skeleton

        # A name never used before: workers cache the model they opened by its path.
        path = self.folder / f"graph-{uuid.uuid4().hex[:12]}.onnx"
        return save_skeleton(skeleton, path, external_data=True)

    def _remove(self, path: Path) -> None:
        for file in (path, Path(f"{path}.data")):
            file.unlink(missing_ok=True)

    def _run(self, kind: str, task: Callable, batches: Sequence[CalibrationBatch],
             arguments: Callable) -> tuple[list, list[range]]:
        """Submit ``task(*arguments(shard))`` per shard: (results, shards) in shard order, or one clear error."""
        from distributed import as_completed

        shards = shard_ranges(len(batches), self.config.shards or self.workers)
        keys = {}
        futures = []
        for index, shard in enumerate(shards):
            future = self.client.submit(task, *arguments(shard), key=f"qcompile-{kind}-{uuid.uuid4().hex[:8]}-{index}",
                                        retries=self.config.retries, pure=False)
            keys[future.key] = index
            futures.append(future)
        results: dict[int, object] = {}
        try:
            for future in as_completed(futures):
                index = keys[future.key]
                if future.status != "finished":
                    shard = shards[index]
                    files = f"{batches[shard[0]].source}..{batches[shard[-1]].source}"
                    raise QCompileError(f"calibration shard {index} ({files}, batches {shard.start}-{shard.stop - 1}) "
                                        f"could not be processed: {_reason(future)}")
                results[index] = future.result()
        finally:
            self.client.cancel(futures)
        return [results[index] for index in range(len(shards))], shards

    def statistics(self, skeleton, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int | None], config):
        """``collect_statistics(skeleton, batches, tensors, config)``, computed shard by shard on the cluster."""
        batches = list(batches)
        config = replace(config, threads=self.threads, progress=False)
        path = self._write(skeleton)
        try:
            parts, shards = self._run("statistics", shard_statistics, batches,
                                      lambda shard: (str(path), batches[shard.start:shard.stop], dict(tensors), config))
            # A tensor captured in full (non-finite values) in some shard: the others capture it in full too.
            full = {name for part in parts for name, stats in part.items() if stats.hist_counts.size}
            partial = {name for name in full if any(not part[name].hist_counts.size for part in parts)}
            if partial:
                full_config = replace(config, ranges_only=False)
                redo, _ = self._run("statistics-full", shard_statistics, batches,
                                    lambda shard: (str(path), batches[shard.start:shard.stop],
                                                   {name: tensors[name] for name in partial}, full_config))
                for part, again in zip(parts, redo):
                    part.update(again)
        finally:
            self._remove(path)
        merged = {}
        for index, part in enumerate(parts):
            for name, stats in part.items():
                if name in merged:
                    merged[name].merge(stats, source=f"calibration shard {index}")
                else:
                    merged[name] = stats
        expected = sum(batch.batch_size for batch in batches)
        short = [name for name, stats in merged.items() if stats.samples != expected]
        if short:
            raise QCompileError(f"calibration cluster: tensor '{short[0]}' merged {merged[short[0]].samples} of "
                                f"{expected} samples; refusing a partial calibration")
        self.runs.append({"capture": "statistics", "tensors": len(merged), "shards": len(shards),
                          "samples_merged": expected})
        return {name: merged[name] for name in tensors}

    def sample_rows(self, skeleton, batches: Sequence[CalibrationBatch], tensors: Mapping[str, int],
                    per_batch: int, seed: int, order: Sequence[str]) -> dict:
        """``row_samples.sample_rows`` over ``batches``, shard by shard: ``{tensor: {batch index: rows}}``."""
        batches = list(batches)
        path = self._write(skeleton)
        try:
            parts, shards = self._run("rows", shard_rows, batches,
                                      lambda shard: (str(path), batches[shard.start:shard.stop], shard.start,
                                                     dict(tensors), per_batch, seed, list(order), self.threads))
        finally:
            self._remove(path)
        samples: dict[str, dict] = {name: {} for name in tensors}
        for part in parts:
            for name, rows in part.items():
                samples[name].update(rows)
        missing = [name for name, rows in samples.items() if len(rows) != len(batches)]
        if missing:
            raise QCompileError(f"calibration cluster: rows of tensor '{missing[0]}' came back from "
                                f"{len(samples[missing[0]])} of {len(batches)} batches; refusing a partial sample")
        self.runs.append({"capture": "row samples", "tensors": len(samples), "shards": len(shards),
                          "samples_merged": sum(batch.batch_size for batch in batches)})
        return samples

    def close(self) -> None:
        if getattr(self, "client", None) is not None and getattr(self, "runs", None):
            try:
                peaks = self.client.run(_peak_rss_bytes, on_error="return")
                self.worker_peaks = {worker: peak for worker, peak in sorted(peaks.items()) if isinstance(peak, int)}
            except Exception as exc:  # a measurement: never worth failing the compile for
                log.warning("calibration cluster: could not read the workers' peak RSS: %s", exc)
        for resource in ("client", "_local"):
            handle = getattr(self, resource, None)
            if handle is not None:
                try:
                    handle.close()
                except Exception as exc:  # closing must not hide the compile's own result or error
                    log.warning("calibration cluster: closing the %s failed: %s", resource.strip("_"), exc)
                setattr(self, resource, None)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def _peak_rss_bytes() -> int | None:
    """Run on each worker by ``close``: its process's peak RSS (``report.peak_rss_bytes``)."""
    from qcompiler.report import peak_rss_bytes

    return peak_rss_bytes()


def _reason(future) -> str:
    """One line for a failed task: the exception's message (KilledWorker says the worker died)."""
    try:
        exc = future.exception()
    except Exception as error:  # the future was lost or cancelled
        return f"{type(error).__name__}: {error}"
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    if type(exc).__name__ == "KilledWorker":
        return f"its worker died on every attempt ({text})"
    return text if isinstance(exc, QCompileError) else f"{type(exc).__name__}: {text}"


__all__ = ["CalibrationCluster", "ClusterConfig", "shard_ranges", "shard_rows", "shard_statistics"]
