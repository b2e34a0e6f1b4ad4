"""Giving freed heap memory back to the OS between the big steps of a compile.

glibc serves allocations below its mmap threshold (which grows up to 32 MiB as large blocks are
freed) from heap arenas, and returns freed arena memory to the OS only from the top. A compile
frees thousands of weight-sized blocks (folded copies of 1–30 MB, ORT's activations with its
arena off), so freed memory can stay in the resident set as holes. ``trim_heap`` asks glibc to
return every free page (``malloc_trim(0)``); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


#: mallopt parameter number of M_MMAP_THRESHOLD (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
#: Outside forward passes: glibc's own ceiling for its dynamic threshold (numpy temporaries of a
#: weight's size are reused from the heap, as by default once the threshold has grown).
_DEFAULT_THRESHOLD = 32 << 20
_forward_threshold: int | None = None


@functools.lru_cache(maxsize=1)
def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def serve_large_blocks_by_mmap(threshold: int = 1 << 20) -> bool:
    """During ORT forward passes (``forward_pass_allocations``), allocations of ``threshold`` bytes
    or more get their own mmap, returned to the OS on free.

    glibc's dynamic threshold rises to 32 MiB as large blocks are freed, so a forward pass's
    activations (1–40 MB each) end up in heap arenas, where fragmentation keeps freed ones resident
    until ``trim_heap``. Measured on PixArt-α's calibration forward pass (one batch of 2): peak
    5.7 → 3.6 GiB with the weights resident. Only around forward passes, because elsewhere every
    weight-sized numpy temporary would be a fresh mmap with its page faults (the SD-1.5 dgq
    lowering took 83 s with a process-wide threshold vs 51 s without, but 91 s scoped in a third
    run: timings varied that much on the shared machine, so the cost is not settled). Process-wide
    setting, so only the CLI (which owns its process) turns it on. True where glibc supports it."""
    global _forward_threshold
    mallopt = _mallopt()
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD) != 1:
        return False
    _forward_threshold = int(threshold)
    return True


@contextlib.contextmanager
def forward_pass_allocations():
    """The forward-pass allocation policy of ``serve_large_blocks_by_mmap`` while inside (if on)."""
    mallopt = _mallopt() if _forward_threshold else None
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _forward_threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)


def trim_heap() -> bool:
    """Return free heap pages to the OS; True where the C library supports it (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
