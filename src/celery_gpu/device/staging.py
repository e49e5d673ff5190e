"""Host → device for task inputs: arrays to torch tensors on this process's device, through pinned memory.

A plain ``torch.from_numpy(a).to("cuda")`` copies from pageable memory: the driver first copies into a
page-locked bounce buffer of its own, then DMAs, synchronously. :func:`to_device` copies the array once into a
page-locked (pinned) staging buffer kept by this process and reused across tasks, then starts an asynchronous
DMA from it (``non_blocking=True``); the buffer is reused only after that copy has finished (a CUDA event).
On the CPU device it returns ``torch.from_numpy`` views (no copy).
"""

from __future__ import annotations

from typing import Any

from ..devices import current_device
from .context import current

__all__ = ["to_device"]


class _Pinned:
    """One page-locked byte buffer of this process, grown as needed, and the event of its last copy."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self.event: Any = None

    def take(self, torch: Any, nbytes: int) -> Any:
        if self.event is not None:
            self.event.synchronize()  # the previous copy out of the buffer has finished
            self.event = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return self.buffer[:nbytes]


def to_device(value: Any, device: str | None = None) -> Any:
    """``value`` with every numpy array (or CPU tensor) in it — nested in lists, tuples and dicts too — as a
    torch tensor on ``device`` (default: this device process's, ``gpu.device.torch``).

    On a CUDA device the copy goes through a pinned staging buffer and is asynchronous: use the tensors on
    the current stream as usual (PyTorch orders the work); the staging buffer is reused only once the copy
    has finished.
    """
    import torch

    if device is None:
        device = current_device().torch
    target = torch.device(device)
    return _convert(torch, value, target)


def _convert(torch: Any, value: Any, target: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray) or (isinstance(value, torch.Tensor) and value.device.type == "cpu"):
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        if target.type != "cuda":
            return tensor.to(target)
        return _stage(torch, tensor.contiguous(), target)
    if isinstance(value, dict):
        return {k: _convert(torch, v, target) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(torch, v, target) for v in value)
    return value


def _stage(torch: Any, tensor: Any, target: Any) -> Any:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return tensor.to(target)
    ctx = current()
    if ctx.pinned is None:
        ctx.pinned = _Pinned()  # one per process, reused across tasks
    pinned: _Pinned = ctx.pinned
    staging = pinned.take(torch, nbytes).view(tensor.dtype).view(tensor.shape)
    staging.copy_(tensor)
    out = staging.to(target, non_blocking=True)
    pinned.event = torch.cuda.Event()
    pinned.event.record(torch.cuda.current_stream(target))
    return out
