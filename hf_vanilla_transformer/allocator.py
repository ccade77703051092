"""glibc's malloc settings for CPU training: keep freed memory for reuse instead of unmapping it (`train.py
--keep_freed_memory`, on by default on CPU). `benchmarks/run.py` measures training under both settings."""

from __future__ import annotations

import ctypes


def keep_freed_memory_in_heap() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; returns whether it took (False off glibc).

    glibc serves each buffer above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it when freed, so
    a training step's large activations and gradients are mapped, page-faulted and zeroed anew on every step. At the
    base size a step's FFN activations are 4096 tokens x 2048 x 4 bytes = 34 MB each. mallopt does at run time what
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=... do at start-up: serve them from the heap,
    never give the heap back, and grow it 1 GiB at a time. torch has no CPU caching allocator of its own to do this.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**30))
    )


__all__ = ["keep_freed_memory_in_heap"]
