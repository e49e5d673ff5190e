"""What the pool counts: tasks per device and outcome, restarts, and histograms of queue wait, run time and
batch size. Kept by the pool on its loop thread; read as plain data (:meth:`Telemetry.counters`,
:meth:`Telemetry.histograms`) into the status snapshot that ``celery inspect gpu``, the ``worker-gpu`` event and
the Prometheus exporter read.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable

from .snapshot import CostInfo, Counters, HistogramData, Histograms

__all__ = ["FILL_WINDOW", "FillWindow", "Histogram", "Telemetry", "TIME_BUCKETS", "SIZE_BUCKETS"]

#: Upper bounds (seconds) of the queue-wait and run-time histograms.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Upper bounds of the batch-size histogram.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Seconds over which the batch fill of a task is averaged (an autoscaling signal).
FILL_WINDOW = 60


class FillWindow:
    """Items and room (``batch`` per batch) of a task's batches over the last :data:`FILL_WINDOW` seconds, in
    one-second buckets: what fraction of its batches' room was filled recently."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: deque[list[int]] = deque()  # [second, items, room], oldest first

    def add(self, items: int, room: int) -> None:
        now = int(self.clock())
        if self.buckets and self.buckets[-1][0] == now:
            self.buckets[-1][1] += items
            self.buckets[-1][2] += room
        else:
            self.buckets.append([now, items, room])
        self._expire(now)

    def ratio(self) -> float | None:
        """Items ÷ room over the window; None when no batch ran in it."""
        self._expire(int(self.clock()))
        room = sum(b[2] for b in self.buckets)
        return round(sum(b[1] for b in self.buckets) / room, 4) if room else None

    def _expire(self, now: int) -> None:
        while self.buckets and self.buckets[0][0] <= now - FILL_WINDOW:
            self.buckets.popleft()


class Histogram:
    """A fixed-bucket histogram, as Prometheus keeps one (cumulative counts, a sum and a count)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def as_json(self) -> HistogramData:
        """``{"buckets": [[le, cumulative count], ..., ["+Inf", count]], "sum", "count"}``."""
        buckets: list[list[object]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            buckets.append([bound, running])
        buckets.append(["+Inf", self.count])
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class Telemetry:
    """The pool's counters and histograms, by device label (and slot, and batched task name)."""

    def __init__(self) -> None:
        self.succeeded: dict[str, int] = defaultdict(int)
        self.failed: dict[str, int] = defaultdict(int)
        self.restarts: dict[tuple[str, int], int] = defaultdict(int)
        self.oom_splits: dict[str, int] = defaultdict(int)
        self.reruns: dict[str, int] = defaultdict(int)  # tasks queued again after their process died
        self.leak_recycles: dict[str, int] = defaultdict(int)  # processes replaced for holding too much memory
        self.sticky_errors: dict[str, int] = defaultdict(int)  # sticky CUDA errors reported by its processes
        self.expired: dict[str, int] = defaultdict(int)  # by task: items ended REVOKED (expired) while waiting
        self.queue_wait: dict[str, Histogram] = {}
        self.run_time: dict[str, Histogram] = {}
        self.batch_size: dict[str, Histogram] = {}
        self._costs: dict[str, CostInfo] = {}  # by task name
        self.fill: dict[str, FillWindow] = {}  # by batched task: its recent batch fill

    def started(self, device: str, waited: float) -> None:
        """A task (or a batch's item) left the pool's queue after ``waited`` seconds."""
        self._hist(self.queue_wait, device, TIME_BUCKETS).observe(max(waited, 0.0))

    def ended(self, device: str, failed: bool, runtime: float | None) -> None:
        """A task ended on ``device``; ``runtime`` is its time in the device process, when known."""
        (self.failed if failed else self.succeeded)[device] += 1
        if runtime is not None:
            self._hist(self.run_time, device, TIME_BUCKETS).observe(max(runtime, 0.0))

    def batch(self, task: str, size: int, room: int = 0) -> None:
        """A batch of ``size`` items of ``task`` (whose ``batch`` is ``room``) was sent to a device process."""
        self._hist(self.batch_size, task, SIZE_BUCKETS).observe(size)
        if room:
            self.fill.setdefault(task, FillWindow()).add(size, room)

    def batch_fill(self) -> dict[str, float | None]:
        """Per batched task: items ÷ room of its batches over the last :data:`FILL_WINDOW` seconds."""
        return {task: window.ratio() for task, window in sorted(self.fill.items())}

    def cost(self, task: str, items: int, seconds: float, joules: float | None) -> None:
        """``items`` items (or one plain task) of ``task`` ran calls that took ``seconds`` of device time and
        ``joules`` of energy (None: not measured)."""
        cost = self._costs.setdefault(task, {"items": 0, "device_s": 0.0, "energy_j": None})
        cost["items"] += items
        cost["device_s"] += seconds
        if joules is not None:
            cost["energy_j"] = (cost["energy_j"] or 0.0) + joules

    def costs(self) -> dict[str, CostInfo]:
        """Per task: items metered, their device time and energy (copies)."""
        return {task: {**cost} for task, cost in sorted(self._costs.items())}

    def restarted(self, device: str, slot: int) -> None:
        """A device process was replaced (it died, was killed, or recycled)."""
        self.restarts[(device, slot)] += 1

    def counters(self, device: str) -> Counters:
        return {
            "succeeded": self.succeeded[device], "failed": self.failed[device],
            "restarts": sum(n for (d, _), n in self.restarts.items() if d == device),
            "oom_splits": self.oom_splits[device], "reruns": self.reruns[device],
            "leak_recycles": self.leak_recycles[device], "sticky_errors": self.sticky_errors[device],
        }

    def histograms(self) -> Histograms:
        return {
            "queue_wait_seconds": {k: h.as_json() for k, h in self.queue_wait.items()},
            "run_seconds": {k: h.as_json() for k, h in self.run_time.items()},
            "batch_size": {k: h.as_json() for k, h in self.batch_size.items()},
        }

    @staticmethod
    def _hist(table: dict[str, Histogram], key: str, bounds: tuple[float, ...]) -> Histogram:
        if key not in table:
            table[key] = Histogram(bounds)
        return table[key]
