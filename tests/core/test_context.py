"""CompileContext.spill: large in-memory arrays go to scratch files and come back memory-mapped."""

from pathlib import Path

import numpy as np

from qcompiler.context import SPILL_BYTES, CompileContext, QuantSettings
from tests import graphs


def test_spill_maps_large_arrays_back_and_close_removes_the_files():
    ctx = CompileContext(graphs.linear_model(), QuantSettings())
    big = np.random.default_rng(0).standard_normal(SPILL_BYTES // 4 + 16).astype(np.float32).reshape(-1, 16)
    small = np.ones((4, 4), np.float32)
    spilled = ctx.spill(big)
    assert isinstance(spilled, np.memmap) and spilled.shape == big.shape
    np.testing.assert_array_equal(spilled, big)
    assert ctx.spill(small) is small and ctx.spill(spilled) is spilled
    folder = Path(spilled.filename).parent
    del spilled
    ctx.close()
    assert not folder.exists()


def test_large_blocks_by_mmap_is_accepted_by_glibc():
    """The CLI's allocator setting: glibc accepts M_MMAP_THRESHOLD (elsewhere it reports False)."""
    import ctypes.util

    from qcompiler.memory import serve_large_blocks_by_mmap

    libc = ctypes.util.find_library("c") or ""
    assert serve_large_blocks_by_mmap(1 << 20) is ("libc.so" in libc)


def test_statistics_of_parts_merge_into_the_whole_sets_statistics():
    """A hold-out split's fit and held-out rows, computed apart, give each part's ranges, and their
    merge is what one pass over all rows gives (so ``statistics`` serves it without another pass)."""
    from qcompiler.calibration.holdout import split_holdout
    from qcompiler.calibration.readers import CalibrationBatch

    rng = np.random.default_rng(0)
    batches = [CalibrationBatch({"x": rng.standard_normal((4, 4, 16)).astype(np.float32) * (i + 1)}, {}, f"{i}.npz")
               for i in range(3)]
    split = split_holdout(batches, every=4)
    ctx = CompileContext(graphs.linear_model(), QuantSettings(), batches)
    tensors = {"mm": -1, "biased": -1}
    fit, held = ctx.statistics_of_parts(tensors, [split.fit, split.held_out], progress=False)
    whole = CompileContext(graphs.linear_model(), QuantSettings(), batches).statistics(tensors, progress=False)
    calls = []
    ctx._collect = lambda *args: calls.append(args)  # a cache miss would call it
    cached = ctx.statistics(tensors, progress=False)
    assert not calls
    for name in tensors:
        for field in ("channel_min", "channel_max", "index_min", "index_max"):
            np.testing.assert_array_equal(getattr(cached[name], field), getattr(whole[name], field))
        assert cached[name].samples == whole[name].samples == fit[name].samples + held[name].samples
        assert (cached[name].min, cached[name].max) == (whole[name].min, whole[name].max)
        # the parts differ from the whole: the held-out rows are really apart
        assert not np.array_equal(fit[name].channel_max, held[name].channel_max)


def test_the_first_statistics_pass_also_caches_every_quantization_point():
    """After weights are integer, one calibration pass also reduces every GEMM input and Conv output,
    so a later pass asking for them (activation QDQ after DGQ's planning) needs no forward pass."""
    from qcompiler.calibration.readers import CalibrationBatch
    from qcompiler.passes import QuantizeWeights

    rng = np.random.default_rng(0)
    batches = [CalibrationBatch({"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}, {}, f"{i}.npz")
               for i in range(2)]
    ctx = CompileContext(graphs.conv_model(), QuantSettings(), batches)
    QuantizeWeights().call(ctx)
    first = ctx.statistics({"x": 1}, progress=False)
    calls = []
    ctx._collect = lambda *args: calls.append(args)  # a cache miss would call it
    later = ctx.statistics({"x": 1, "r1": 1, "c1": 1, "y": 1}, progress=False)  # Conv inputs and outputs
    assert not calls and later["x"] is first["x"]
    fresh = CompileContext(graphs.conv_model(), QuantSettings(), batches)
    QuantizeWeights().call(fresh)
    alone = fresh.statistics({"r1": 1}, progress=False)
    np.testing.assert_array_equal(later["r1"].channel_max, alone["r1"].channel_max)
