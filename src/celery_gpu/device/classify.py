"""What kind of failure an exception raised in a device process is: out of memory, sticky, or ordinary.

This is the one place that decides it; the device process's reactions (``recovery.py``) and the batch splitter
(``split.py``) act on it:

* ``"oom"``: the device ran out of memory (torch ``OutOfMemoryError``, CuPy's ``OutOfMemoryError``, the "CUDA
  out of memory" message family, cuBLAS/cuDNN allocation failures). The process is healthy: free the cache,
  split the batch, retry.
* ``"sticky"``: a CUDA error that poisons the process's context for good (illegal address, device-side assert,
  launch failure, ECC, misaligned address, illegal instruction...). Every later CUDA call fails the same way,
  so the process must take no more work and be replaced.
* ``"error"``: anything else: an ordinary task exception.

Exceptions are recognised by class name and message, so nothing here imports torch or CuPy, and the
exception chain (``__cause__``, ``__context__``) is searched: a task that wraps a CUDA error is still seen.
"""

from __future__ import annotations

import re
from typing import Literal

from ..units import UNITS

__all__ = ["FailureKind", "classify", "requested_bytes"]

FailureKind = Literal["oom", "sticky", "error"]

_OOM_TYPES = {"OutOfMemoryError", "CUDARuntimeError:cudaErrorMemoryAllocation"}
_OOM_MESSAGES = (
    "cuda out of memory",
    "out of memory",  # "CUDA error: out of memory", CuPy's "Out of memory allocating ..."
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cufft_alloc_failed",
    "cusolver_status_alloc_failed",
)
_STICKY_MESSAGES = (
    "illegal memory access",
    "cudaerrorillegaladdress",
    "cuda_error_illegal_address",
    "device-side assert",
    "cudaerrorassert",
    "cuda_error_assert",
    "unspecified launch failure",
    "cudaerrorlaunchfailure",
    "cuda_error_launch_failed",
    "launch failure",
    "uncorrectable ecc error",
    "cudaerrorecc",
    "cuda_error_ecc_uncorrectable",
    "misaligned address",
    "cudaerrormisalignedaddress",
    "illegal instruction",
    "cudaerrorillegalinstruction",
    "hardware stack error",
    "cudaerrorhardwarestackerror",
    "invalid program counter",
    "cudaerrorinvalidpc",
    "cuda_error_illegal_instruction",
    "cudaerrorlaunchtimeout",  # the watchdog of a display GPU killed a kernel: the context is lost
    "cuda_error_launch_timeout",
    "gpu has fallen off the bus",
    "cudaerrordevicesunavailable",
)
_SIZE = re.compile(
    r"(?:tried to allocate|allocating|failed to allocate)\s+([\d.,]+)\s*([kmgt]i?b|bytes?|b)?", re.IGNORECASE
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _one(exc: BaseException) -> FailureKind:
    text = f"{type(exc).__name__}: {exc}".lower()
    # Sticky first: "an illegal memory access" must never be read as an allocation failure.
    if any(m in text for m in _STICKY_MESSAGES):
        return "sticky"
    if type(exc).__name__ in _OOM_TYPES or isinstance(exc, MemoryError) and "cuda" in text:
        return "oom"
    if any(m in text for m in _OOM_MESSAGES):
        return "oom"
    return "error"


def classify(exc: BaseException) -> FailureKind:
    """``"sticky"``, ``"oom"`` or ``"error"`` for an exception (and its chain) raised by task code.

    A plain host ``MemoryError`` (Python could not allocate) is ``"error"``: it is not the device's memory.
    """
    kinds = [_one(e) for e in _chain(exc)]
    if "sticky" in kinds:
        return "sticky"
    if "oom" in kinds:
        return "oom"
    return "error"


def requested_bytes(exc: BaseException) -> int | None:
    """The allocation an out-of-memory error reports ("Tried to allocate 2.00 GiB"), in bytes, if it says."""
    for e in _chain(exc):
        match = _SIZE.search(str(e))
        if match:
            unit = (match.group(2) or "b").lower()
            try:
                return int(float(match.group(1).replace(",", "")) * UNITS.get(unit, 1))
            except ValueError:
                return None
    return None
