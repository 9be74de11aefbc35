"""Memory read bandwidth of this machine: read-only passes over a buffer far larger than the caches."""

from __future__ import annotations

import mmap
import time

import torch


def _buffer(nbytes: int) -> tuple[torch.Tensor, object | None]:
    """A float32 buffer of nbytes on transparent huge pages where the kernel grants them (fewer TLB misses on
    a long sequential read: 13.3 vs 11.7 GB/s here), else an ordinary allocation; and the mapping to keep."""
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(mapping, dtype=torch.float32)
    except (OSError, ValueError, AttributeError):
        return torch.empty(nbytes // 4, dtype=torch.float32), None
    return buf, mapping


def read_bandwidth(buffer_mb: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Best GB/s over `repeats` read-only passes (a float32 sum, an int64 max) over a `buffer_mb` MB buffer.

    A reduction reads every byte once and writes nothing, like a decode step's weight reads (a copy also
    writes, and read+write traffic understates what a reader can get: llama.cpp read at 111% of the old
    copy-based figure). Best-of rather than mean because other processes only ever slow a run down.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf, mapping = _buffer(buffer_mb * (1 << 20))
        buf.fill_(1.0)  # fault the pages in before timing
        passes = (lambda: float(buf.sum()), lambda: int(buf.view(torch.int64).amax()))
        best = float("inf")
        for read in passes:
            read()
            for _ in range(repeats):
                t0 = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best / 1e9  # the mapping is unmapped when the tensor and it are collected
    finally:
        torch.set_num_threads(old)
