"""The state of a process that runs task code, in one object.

A device process makes its :class:`DeviceContext` at start (:func:`install`): the faults injected into it, how
it reports a sticky CUDA error, the counters it sends back with each result. Every other process (a client in
eager mode, a test) has the default context: no faults, and a sticky error is an ordinary failure there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .faults import Faults

__all__ = ["DeviceContext", "current", "install"]


@dataclass
class DeviceContext:
    """What this process's runtime keeps between calls of task code.

    Attributes:
        faults: the faults injected into this process (fake devices only), or None.
        on_sticky: how a sticky CUDA error is reported (``on_sticky(error, traceback)`` ends the process and
            never returns); None outside a device process.
        in_task: whether task code runs now (a soft time limit only interrupts it then).
        accept: the app's ``accept_content``, prepared once (kombu's form).
        calls: calls of batch functions so far (bisection included).
        oom_splits: out-of-memory recoveries since the last :meth:`take_oom_stats`.
        oom_fit: the largest call that fit after an out-of-memory split, since then.
        peak_baseline: device memory allocated when the current call's peak measurement started.
        pinned: the host staging buffer of :func:`celery_gpu.device.staging.to_device`, once made.
    """

    faults: Faults | None = None
    on_sticky: Callable[[str, str], None] | None = None
    in_task: bool = False
    accept: Any = None
    calls: int = 0
    oom_splits: int = 0
    oom_fit: int = 0
    peak_baseline: int = 0
    pinned: Any = None

    def on_call(self, items: int) -> None:
        """Before each call of task code: injected faults fire here (fake devices)."""
        if self.faults is not None:
            self.faults.on_call(items)

    def note_split(self) -> None:
        """Count one batch split after running out of memory."""
        self.oom_splits += 1

    def note_fit(self, items: int) -> None:
        """A call of ``items`` items succeeded after an out-of-memory split."""
        self.oom_fit = max(self.oom_fit, items)

    def take_oom_stats(self) -> tuple[int, int]:
        """``(splits, largest call that fit after a split)`` since the last read; both reset."""
        stats = self.oom_splits, self.oom_fit
        self.oom_splits = self.oom_fit = 0
        return stats


_current = DeviceContext()


def current() -> DeviceContext:
    """This process's context (the default one outside a device process)."""
    return _current


def install(ctx: DeviceContext) -> DeviceContext:
    """Make ``ctx`` this process's context (a device process does it once, at start); returns it."""
    global _current
    _current = ctx
    return ctx
