"""What a device process does when task code fails on the device (see ``classify.py`` for the kinds).

* Out of memory: free what can be freed (garbage, allocator caches) and try again in the same process: a
  batch in halves (``batch.call_batch``), a single task or item once more; one that still does not fit
  fails with :class:`DeviceOutOfMemory` naming the memory it wanted.
* Sticky CUDA error: the context is poisoned, so nothing more this process computes can be trusted. It
  tells the pool (a ``poisoned`` frame) and exits at once, before any result of the task or batch is stored;
  the pool replaces it and runs its in-flight tasks again elsewhere.
* Anything else: an ordinary task failure, handled by Celery as usual.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Any

from . import devmem, faults
from .classify import FailureKind, classify, requested_bytes
from .errors import DeviceOutOfMemory

__all__ = ["install", "triage", "guard_run", "out_of_memory", "oom_stats"]

_on_sticky: Callable[[str, str], None] | None = None
#: Out-of-memory recoveries in this process since the last :func:`oom_stats` read: ``[splits, fit]``.
_oom = [0, 0]


def install(on_sticky: Callable[[str, str], None]) -> None:
    """Set how this device process reports a sticky error (``on_sticky(error, traceback)`` must not return)."""
    global _on_sticky
    _on_sticky = on_sticky


def triage(exc: BaseException) -> FailureKind:
    """The kind of a failure of task code; a sticky one ends a device process here (reported, then exit: this
    never returns there), while outside a device process it is returned like any other kind."""
    kind = classify(exc)
    if kind == "sticky" and _on_sticky is not None:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        _on_sticky(f"{type(exc).__name__}: {exc}", text)
    return kind


def note_split() -> None:
    """Count one batch split after running out of memory."""
    _oom[0] += 1


def note_fit(items: int) -> None:
    """A call of ``items`` items succeeded after an out-of-memory split."""
    _oom[1] = max(_oom[1], items)


def oom_stats() -> tuple[int, int]:
    """``(splits, largest call that fit after a split)`` since the last read; both reset."""
    splits, fit = _oom
    _oom[:] = [0, 0]
    return splits, fit


def out_of_memory(task_name: str, exc: BaseException, items: int = 1) -> DeviceOutOfMemory:
    """The error of a task (or one batch item) that does not fit even alone, with a freed cache."""
    from .devices import _current

    wanted = requested_bytes(exc)
    where = f"{_current.label} ({_human(_current.total_memory)} in all)" if _current is not None else "its device"
    what = f"an allocation of {_human(wanted)}" if wanted is not None else "more memory than is free"
    unit = "one item of " if items == 1 else ""
    return DeviceOutOfMemory(
        f"{unit}{task_name} does not fit on {where}: it asked for {what} after the allocator cache was "
        f"freed ({type(exc).__name__}: {str(exc)[:300]}); give it a bigger device or smaller inputs"
    )


def guard_run(task: Any) -> None:
    """Wrap a plain GPU task's ``run`` (once) with the reactions above; batched tasks are handled per call."""
    if getattr(task, "_gpu_guarded", False):
        return
    run = task.run

    @functools.wraps(run)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for attempt in (1, 2):  # the second only after an out-of-memory error, with the cache freed
            try:
                faults.on_call(1)
                return run(*args, **kwargs)
            except Exception as exc:
                if triage(exc) != "oom":
                    raise
                if attempt == 2:
                    raise out_of_memory(task.name, exc) from exc
            devmem.free_cached()  # outside the except block: the traceback no longer pins the failed frames
        raise AssertionError("unreachable")

    task.run = guarded
    task._gpu_guarded = True


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"
