"""Failure classification: out of memory, sticky CUDA errors, ordinary exceptions (one place decides)."""

from __future__ import annotations

import pytest

from celery_gpu.device.classify import classify, requested_bytes
from celery_gpu.device.faults import FakeCudaError, OutOfMemoryError


def _named(name: str, module: str, base: type[BaseException] = RuntimeError) -> type[BaseException]:
    cls = type(name, (base,), {})
    cls.__module__ = module
    return cls


TorchOOM = _named("OutOfMemoryError", "torch.cuda")
CupyOOM = _named("OutOfMemoryError", "cupy.cuda.memory", MemoryError)
AcceleratorError = _named("AcceleratorError", "torch")
CUDARuntimeError = _named("CUDARuntimeError", "cupy_backends.cuda.api.runtime")


@pytest.mark.parametrize("exc", [
    TorchOOM("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"),
    CupyOOM("Out of memory allocating 1,073,741,824 bytes (allocated so far: 0 bytes)."),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    CUDARuntimeError("cudaErrorMemoryAllocation: out of memory"),
    OutOfMemoryError("CUDA out of memory. Tried to allocate 100 bytes (fake device)"),
])
def test_out_of_memory(exc: BaseException) -> None:
    assert classify(exc) == "oom"


@pytest.mark.parametrize("exc", [
    AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    RuntimeError("CUDA error: misaligned address"),
    RuntimeError("CUDA error: an illegal instruction was encountered"),
    CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered"),
    RuntimeError("CUDA_ERROR_LAUNCH_FAILED: unspecified launch failure"),
    FakeCudaError("CUDA error: an illegal memory access was encountered (fake device)"),
])
def test_sticky(exc: BaseException) -> None:
    assert classify(exc) == "sticky"


@pytest.mark.parametrize("exc", [
    ValueError("bad input"), KeyError("x"), MemoryError(), RuntimeError("expected scalar type Float"),
    RuntimeError("CUDA error: invalid argument"), ZeroDivisionError(),
])
def test_ordinary(exc: BaseException) -> None:
    assert classify(exc) == "error"


def test_the_chain_is_searched() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: device-side assert triggered")
        except RuntimeError as inner:
            raise ValueError("embedding failed") from inner
    except ValueError as outer:
        assert classify(outer) == "sticky"
    try:
        try:
            raise TorchOOM("CUDA out of memory. Tried to allocate 20.00 MiB")
        except RuntimeError:
            raise KeyError("while handling")  # noqa: B904  (the implicit context is the point)
    except KeyError as outer:
        assert classify(outer) == "oom"


def test_sticky_wins_over_oom() -> None:
    # An out-of-memory message mentioning an illegal address is a poisoned context, not a full one.
    assert classify(RuntimeError("out of memory after an illegal memory access")) == "sticky"


@pytest.mark.parametrize(("text", "expected"), [
    ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)", 2 * 1024**3),
    ("CUDA out of memory. Tried to allocate 20.00 MiB", 20 * 1024**2),
    ("Out of memory allocating 1,073,741,824 bytes (allocated so far: 0 bytes).", 1073741824),
    ("CUDA out of memory. Tried to allocate 512 bytes", 512),
    ("CUDA error: out of memory", None),
])
def test_requested_bytes(text: str, expected: int | None) -> None:
    assert requested_bytes(RuntimeError(text)) == expected
