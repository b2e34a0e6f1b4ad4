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
