"""Calibration on a dask cluster (2 worker processes) equals the single-process run bit for bit, and
a failing or killed worker either changes nothing (its shard is retried) or stops the compile with
one line naming the shard."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from distributed import LocalCluster
from onnx import TensorProto, helper

from qcompiler.calibration import StatsConfig, collect_statistics, load_calibration
from qcompiler.calibration import distributed as distributed_module
from qcompiler.calibration.capture import as_skeleton
from qcompiler.calibration.distributed import CalibrationCluster, ClusterConfig, shard_ranges
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.cli.main import main
from qcompiler.errors import QCompileError
from qcompiler.models import DIGITS_VIT
from tests.calibration.test_statistics import build, matmul_model

UNET = Path(__file__).resolve().parents[2] / "models" / "unet_mnist.onnx"
FIELDS = ("channel_min", "channel_max", "index_min", "index_max", "hist_counts", "hist_edges")
SCALARS = ("samples", "min", "max", "absmax", "count", "nonfinite", "sum_abs", "shape", "channel_axis")


@pytest.fixture(scope="module")
def scheduler():
    """One local cluster of 2 worker processes for the module; tests reach it as an existing scheduler."""
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           scheduler_kwargs={"dashboard": False}, silence_logs=logging.CRITICAL)
    yield cluster.scheduler_address
    cluster.close()


def assert_bitwise_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        for field in FIELDS:
            a, b = getattr(got[name], field), getattr(expected[name], field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, field)
        for field in SCALARS:
            assert getattr(got[name], field) == getattr(expected[name], field), (name, field)


def unet_tensors(count: int) -> dict[str, int]:
    """The graph input and every k-th Conv/MatMul input of the UNet (channel axis 1 / last)."""
    model = onnx.load(str(UNET), load_external_data=False)
    names = {"sample": 1}
    gemms = [node for node in model.graph.node if node.op_type in ("Conv", "MatMul")]
    for node in gemms[::max(1, len(gemms) // count)]:
        names[node.input[0]] = 1 if node.op_type == "Conv" else -1
    return names


def test_shards_cover_every_batch_once():
    assert shard_ranges(5, 2) == [range(0, 2), range(2, 5)]
    assert shard_ranges(2, 4) == [range(0, 1), range(1, 2)]  # never an empty shard
    assert [i for shard in shard_ranges(7, 3) for i in shard] == list(range(7))


@pytest.mark.parametrize("ranges_only", [True, False])
def test_merged_statistics_are_bitwise_those_of_one_process(scheduler, ranges_only):
    files = load_calibration(UNET.with_suffix(".calib"), onnx.load(str(UNET), load_external_data=False), limit=96)
    # 3 files cut to 4, 4 and 2 samples (the UNet's forward passes are what this test spends its time on).
    batches = [CalibrationBatch({k: v[:n] for k, v in b.feeds.items()}, {k: v[:n] for k, v in b.metadata.items()},
                                b.source) for b, n in zip(files, (4, 4, 2))]
    tensors = unet_tensors(6)
    config = StatsConfig(progress=False, ranges_only=ranges_only)
    expected = collect_statistics(as_skeleton(UNET), batches, tensors, config)
    # 3 shards of one file each, unequal: the merge spans shards of different sizes.
    cluster = CalibrationCluster(ClusterConfig(address=scheduler, shards=4))
    try:
        got = cluster.statistics(as_skeleton(UNET), batches, tensors, config)
    finally:
        cluster.close()
    assert_bitwise_equal(got, expected)
    assert cluster.runs == [{"capture": "statistics", "tensors": len(tensors), "shards": 3, "samples_merged": 10}]
    if not ranges_only:  # the histograms and sums that were merged are real (not empty) data
        assert all(stats.hist_counts.sum() == stats.count > 0 and stats.sum_abs > 0 for stats in got.values())


def test_non_finite_values_in_one_shard_give_full_statistics_in_all(scheduler):
    # y = 1/x: the zero in batch 2 makes y infinite there only; that shard captures y in full (it
    # counts the non-finite value), so the driver has the other shards capture y in full too.
    model = build([helper.make_node("Reciprocal", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])], [])
    rng = np.random.default_rng(0)
    parts = [rng.uniform(0.5, 2.0, (2, 3)).astype(np.float32) for _ in range(4)]
    parts[2][1, 1] = 0.0
    batches = [CalibrationBatch({"x": part}, {}, f"{index}.npz") for index, part in enumerate(parts)]
    config = StatsConfig(progress=False, ranges_only=True)
    expected = collect_statistics(model, batches, {"y": None}, config)
    cluster = CalibrationCluster(ClusterConfig(address=scheduler))
    try:
        got = cluster.statistics(as_skeleton(model), batches, {"y": None}, config)
    finally:
        cluster.close()
    assert expected["y"].nonfinite == 1 and expected["y"].hist_counts.size  # the full path did run
    assert_bitwise_equal(got, expected)


def compile_bytes(tmp_path: Path, name: str, model: Path, *options: str) -> bytes:
    out = tmp_path / name / "model.onnx"
    out.parent.mkdir()
    assert main([str(model), "-o", str(out), "--quiet", *options]) == 0
    return out.read_bytes()


def test_unet_minmax_on_a_scheduler_writes_the_same_model(tmp_path, scheduler):
    options = ("--recipe", "minmax", "--calib-limit", "34")  # 2 files: 32 + 2 samples
    single = compile_bytes(tmp_path, "single", UNET, *options)
    # One ORT thread per worker (two workers share this machine's cores); threads do not change results.
    assert compile_bytes(tmp_path, "cluster", UNET, *options, "--cluster", scheduler, "--threads", "1") == single
    report = (tmp_path / "cluster" / "model.onnx.report.json").read_text()
    assert '"samples_merged": 34' in report and '"local": false' in report


@pytest.mark.slow
def test_vit_osplus_on_local_workers_writes_the_same_model(tmp_path):
    # osplus also draws its search rows on the workers (row_samples.sample_rows per shard).
    options = ("--recipe", "osplus", "--calib", str(DIGITS_VIT.with_suffix(".calib")), "--calib-limit", "32")
    single = compile_bytes(tmp_path, "single", DIGITS_VIT, *options)
    assert compile_bytes(tmp_path, "workers", DIGITS_VIT, *options, "--workers", "2") == single
    report = (tmp_path / "workers" / "model.onnx.report.json").read_text()
    assert '"capture": "row samples"' in report and '"local": true' in report


# Faulty tasks: run on the workers (imported from this module there), keyed by files in a folder both
# sides see. Each wraps the real task, so a shard that does finish returns real statistics.

def dies_once(marker: str, *args):
    """Kills its worker process the first time it runs the shard holding file 1.npz."""
    if any(batch.source == "1.npz" for batch in args[1]) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return distributed_module.shard_statistics(*args)


def raises_once(marker: str, *args):
    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("transient failure")
    return distributed_module.shard_statistics(*args)


def always_fails(*args):
    if any(batch.source == "1.npz" for batch in args[1]):
        raise RuntimeError("disk on fire\nsecond line that must not be printed")
    return distributed_module.shard_statistics(*args)


def small_case():
    rng = np.random.default_rng(1)
    model = matmul_model(rng.standard_normal((3, 5)).astype(np.float32))  # x (B, 4, 3) -> h -> Relu -> y
    batches = [CalibrationBatch({"x": rng.standard_normal((2, 4, 3)).astype(np.float32)}, {}, f"{index}.npz")
               for index in range(4)]
    return model, batches, {"x": None, "h": 1, "y": None}


@pytest.mark.parametrize("fault", ["killed worker", "raised once"])
def test_a_failed_shard_is_retried_and_the_result_is_unchanged(scheduler, tmp_path, monkeypatch, fault):
    model, batches, tensors = small_case()
    config = StatsConfig(progress=False, ranges_only=True)
    expected = collect_statistics(model, batches, tensors, config)
    marker = str(tmp_path / "failed-once")
    task = dies_once if fault == "killed worker" else raises_once
    monkeypatch.setattr(distributed_module, "shard_statistics",
                        lambda *args: task(marker, *args))
    cluster = CalibrationCluster(ClusterConfig(address=scheduler, shards=4))
    try:
        got = cluster.statistics(as_skeleton(model), batches, tensors, config)
    finally:
        cluster.close()
    assert os.path.exists(marker)  # the fault did happen
    assert_bitwise_equal(got, expected)
    assert cluster.runs[0]["samples_merged"] == 8


def test_a_shard_that_always_fails_stops_with_one_line_naming_it(scheduler, tmp_path, monkeypatch, capsys):
    model, batches, tensors = small_case()
    monkeypatch.setattr(distributed_module, "shard_statistics", always_fails)
    cluster = CalibrationCluster(ClusterConfig(address=scheduler, shards=4, retries=1))
    try:
        with pytest.raises(QCompileError, match=r"calibration shard 1 \(1.npz..1.npz, batches 1-1\) could not be "
                                                r"processed: RuntimeError: disk on fire$"):
            cluster.statistics(as_skeleton(model), batches, tensors, StatsConfig(progress=False, ranges_only=True))
    finally:
        cluster.close()
    # Through the CLI: exit code 2, one line, no output written.
    onnx.save(model, str(tmp_path / "m.onnx"))
    calib = tmp_path / "m.calib"
    calib.mkdir()
    for batch in batches:
        np.savez(calib / batch.source, **batch.feeds)
    code = main([str(tmp_path / "m.onnx"), "--recipe", "minmax", "-o", str(tmp_path / "out.onnx"), "--quiet",
                 "--cluster", scheduler])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qcompile")]
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(r"qcompile: error: calibration shard \d \(\d.npz..\d.npz, batches \d-\d\) could not be "
                        r"processed: RuntimeError: disk on fire", lines[0]), lines
    assert not (tmp_path / "out.onnx").exists()


def test_no_scheduler_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(QCompileError, match="could not connect"):
        CalibrationCluster(ClusterConfig(address="tcp://127.0.0.1:9", connect_timeout=2))
    with pytest.raises(QCompileError, match="--shared-dir must be an existing writable folder"):  # before connecting
        CalibrationCluster(ClusterConfig(address="tcp://127.0.0.1:9", shared_dir=str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="2"):  # argparse: --workers and --cluster exclude each other
        main([str(DIGITS_VIT), "-o", str(tmp_path / "out.onnx"), "--workers", "2", "--cluster", "tcp://127.0.0.1:9"])
    assert main([str(DIGITS_VIT), "-o", str(tmp_path / "out.onnx"), "--quiet", "--shared-dir", str(tmp_path)]) == 2
    assert "--shared-dir is for a calibration cluster" in capsys.readouterr().err
