"""Memory read bandwidth of this machine: a sum over a buffer far larger than the caches."""

from __future__ import annotations

import time

import torch


def read_bandwidth(buffer_mb: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Best-of-`repeats` GB/s of `torch.sum` over a float32 buffer of `buffer_mb` MB.

    A reduction reads every byte once and writes nothing, like a decode step's weight reads; best-of
    rather than mean because other processes only ever slow a run down.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(buffer_mb * (1 << 20) // 4, dtype=torch.float32)
        float(buf.sum())  # fault the pages in before timing
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            float(buf.sum())
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)
