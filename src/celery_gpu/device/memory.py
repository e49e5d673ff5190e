"""Device memory as a device process sees it: what it holds now, the peak of a call, and freeing the caches.

Read from the allocators already in use (torch's CUDA caching allocator, CuPy's memory pool) and from fake
devices' injected faults; nothing here imports torch or CuPy, or creates a CUDA context, by itself. On the
CPU device the process's resident memory stands for its device memory.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from .context import DeviceContext

__all__ = ["allocated", "free_cached", "in_use", "peak", "start_peak"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _torch_cuda() -> Any:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return cuda if cuda is not None and cuda.is_initialized() else None
    except Exception:  # a poisoned context
        return None


def _cupy_pool() -> Any:
    cupy = sys.modules.get("cupy")
    try:
        return cupy.get_default_memory_pool() if cupy is not None else None
    except Exception:
        return None


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def in_use(ctx: DeviceContext, kind: str) -> int:
    """Bytes of device memory this process holds (reserved by its allocators) on a device of ``kind``."""
    if kind == "cpu":
        return _rss()
    total = ctx.faults.leaked if ctx.faults is not None else 0
    cuda = _torch_cuda()
    if cuda is not None:
        total += int(cuda.memory_reserved())
    pool = _cupy_pool()
    if pool is not None:
        total += int(pool.total_bytes())
    return total


def allocated(kind: str) -> int:
    """Bytes this process's live allocations take on a device of ``kind`` now (torch's allocated CUDA memory
    + CuPy's used pool; the CPU device: resident memory; nothing on a fake device unless torch or CuPy run)."""
    if kind == "cpu":
        return _rss()
    total = 0
    cuda = _torch_cuda()
    if cuda is not None:
        total += int(cuda.memory_allocated())
    pool = _cupy_pool()
    if pool is not None:
        total += int(pool.used_bytes())
    return total


def start_peak(ctx: DeviceContext) -> None:
    """Start measuring the peak of the next call (torch's peak statistics are reset)."""
    cuda = _torch_cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
        ctx.peak_baseline = int(cuda.memory_allocated())


def peak(ctx: DeviceContext) -> int | None:
    """Bytes the call since :func:`start_peak` took above what was allocated before it; None when unknown."""
    injected = ctx.faults.last_peak if ctx.faults is not None else 0
    cuda = _torch_cuda()
    if cuda is not None:
        return max(0, int(cuda.max_memory_allocated()) - ctx.peak_baseline) + injected
    if ctx.faults is not None:
        return injected
    return None


def free_cached() -> None:
    """Give back what can be given back after an out-of-memory error: garbage, allocator caches."""
    gc.collect()
    cuda = _torch_cuda()
    if cuda is not None:
        try:
            cuda.empty_cache()
        except Exception:
            pass
    pool = _cupy_pool()
    if pool is not None:
        try:
            pool.free_all_blocks()
        except Exception:
            pass
