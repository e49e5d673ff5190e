"""What a device process does when task code fails on the device (see ``classify.py`` for the kinds).

* Out of memory: free what can be freed (garbage, allocator caches) and try again in the same process: a
  batch in halves (``split.call_batch``), a single task or item once more; one that still does not fit
  fails with :class:`DeviceOutOfMemory` naming the memory it wanted.
* Sticky CUDA error: the context is poisoned, so nothing more this process computes can be trusted. It
  tells the pool (a ``poisoned`` frame) and exits at once, before any result of the task or batch is stored;
  the pool replaces it and runs its in-flight tasks again elsewhere.
* Anything else: an ordinary task failure, handled by Celery as usual.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any

from ..devices import current_device
from ..errors import DeviceOutOfMemory, NotInDeviceProcess
from ..units import human_bytes
from . import memory
from .classify import FailureKind, classify, requested_bytes
from .context import DeviceContext

__all__ = ["out_of_memory", "protect", "triage"]


def triage(ctx: DeviceContext, exc: BaseException) -> FailureKind:
    """The kind of a failure of task code; a sticky one ends a device process here (reported, then exit: this
    never returns there), while outside a device process it is returned like any other kind."""
    kind = classify(exc)
    if kind == "sticky" and ctx.on_sticky is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        ctx.on_sticky(f"{type(exc).__name__}: {exc}", text)
    return kind


def out_of_memory(task_name: str, exc: BaseException, *, item: bool) -> DeviceOutOfMemory:
    """The error of a plain task, or of one item of a batched task (``item``), that does not fit even alone,
    with a freed cache."""
    try:
        device = current_device()
        where = f"{device.label} ({human_bytes(device.total_memory)} in all)"
    except NotInDeviceProcess:
        where = "its device"
    wanted = requested_bytes(exc)
    what = f"an allocation of {human_bytes(wanted)}" if wanted is not None else "more memory than is free"
    unit = "one item of " if item else ""
    return DeviceOutOfMemory(
        f"{unit}{task_name} does not fit on {where}: it asked for {what} after the allocator cache was "
        f"freed ({type(exc).__name__}: {str(exc)[:300]}); give it a bigger device or smaller inputs"
    )


def protect(ctx: DeviceContext, task: Any) -> None:
    """Wrap a plain GPU task's ``run`` (once) with the reactions above; batched tasks are handled per call."""
    if getattr(task, "_gpu_protected", False):
        return
    run = task.run

    @functools.wraps(run)
    def protected(*args: Any, **kwargs: Any) -> Any:
        mark = ctx.cost_mark()
        if ctx.models is not None:  # its model loaded (or room made) first: a load that fails fails the task
            ctx.models.prepare(getattr(task, "gpu_model", None), ctx.models.budget)
        try:
            for attempt in (1, 2):  # the second only after an out-of-memory error, with the cache freed
                try:
                    with ctx.metered():
                        ctx.on_call(1)
                        return run(*args, **kwargs)
                except Exception as exc:
                    if triage(ctx, exc) != "oom":
                        raise
                    if attempt == 2:
                        raise out_of_memory(task.name, exc, item=False) from exc
                memory.free_cached()  # outside the except block: the traceback no longer pins the failed frames
            raise AssertionError("unreachable")
        finally:
            ctx.item_cost = ctx.cost_since(mark)  # its result (stored by the tracer next) may carry it

    task.run = protected
    task._gpu_protected = True
