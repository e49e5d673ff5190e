"""The state of a process that runs task code, in one object.

A device process makes its :class:`DeviceContext` at start (:func:`install`): the faults injected into it, how
it reports a sticky CUDA error, the counters it sends back with each result. Every other process (a client in
eager mode, a test) has the default context: no faults, and a sticky error is an ordinary failure there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cost import Meter
from .faults import Faults

if TYPE_CHECKING:
    from .models import ModelCache

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
        meter: reads the device's energy counter (:mod:`celery_gpu.device.cost`); None: calls are not metered.
        cost_s: device time of the calls metered since the last :meth:`take_cost`.
        cost_j: their energy, in joules (None: no reading).
        item_cost: ``(seconds, joules)``, the share of the task or item being traced now (for its result meta).
        models: the models this process holds (:mod:`celery_gpu.device.models`); None until one is declared
            or used.
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
    meter: Meter | None = None
    cost_s: float = 0.0
    cost_j: float | None = None
    item_cost: tuple[float, float | None] | None = None
    models: ModelCache | None = None

    def on_call(self, items: int) -> None:
        """Before each call of task code: injected faults fire here (fake devices)."""
        if self.faults is not None:
            self.faults.on_call(items)

    @contextmanager
    def metered(self) -> Iterator[None]:
        """Meter one call of task code: its time and energy are added to ``cost_s`` / ``cost_j``."""
        if self.meter is None:
            yield
            return
        started, before = time.monotonic(), self.meter.joules()
        try:
            yield
        finally:
            self.cost_s += time.monotonic() - started
            after = self.meter.joules()
            if before is not None and after is not None:
                self.cost_j = (self.cost_j or 0.0) + max(0.0, after - before)

    def cost_mark(self) -> tuple[float, float | None]:
        """The cost accounted so far (for :meth:`cost_since`)."""
        return self.cost_s, self.cost_j

    def cost_since(self, mark: tuple[float, float | None]) -> tuple[float, float | None]:
        """``(seconds, joules)`` metered since ``mark``."""
        joules = None if self.cost_j is None else self.cost_j - (mark[1] or 0.0)
        return self.cost_s - mark[0], joules

    def take_cost(self) -> tuple[float, float | None]:
        """``(seconds, joules)`` metered since the last read; both reset."""
        cost = self.cost_s, self.cost_j
        self.cost_s, self.cost_j = 0.0, None
        return cost

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
