"""What the pool learns about tasks' device memory: ``memory="auto"`` peaks, and batch sizes that fit.

* ``memory="auto"``: until a task's peak has been seen, each of its runs reserves a whole device (it runs
  alone there); after that it reserves its largest observed peak plus :data:`HEADROOM`. A batched task's
  peak is kept per item and scaled to its full batch size. On a device that cannot measure peaks (the CPU)
  an ``auto`` task reserves nothing once it has run.
* Out-of-memory splits: the largest batch that fit on a device (reported by the device process after a
  split) caps the batches the pool forms for that task on that device. The cap grows back: after ``quiet``
  seconds without another split of that task on that device it doubles, and again after each further quiet
  period, until it reaches the task's ``batch`` and is dropped. A split meanwhile sets it to what fit again
  and restarts the quiet period, so a lasting shortage costs one split per period at most, never a storm.
  ``quiet=0`` keeps a cap for the worker's lifetime.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from ..observe.snapshot import MemoryInfo

__all__ = ["HEADROOM", "MemoryBook"]

logger = logging.getLogger("celery_gpu.pool")

#: Margin over the largest observed peak that ``memory="auto"`` reserves.
HEADROOM = 1.2


class MemoryBook:
    """Learned peaks per task and batch-size caps per (task, device); owned by the pool's loop thread."""

    def __init__(self, quiet: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.peaks: dict[str, int] = {}  # task name -> bytes of one call (plain) or one item (batched)
        self.caps: dict[tuple[str, str], int] = {}  # (task name, device label) -> largest batch allowed now
        self.since: dict[tuple[str, str], float] = {}  # when that cap was last set (a split, or growing back)
        self.quiet = quiet  # seconds without a split after which a cap doubles; 0: caps never grow back
        self.clock = clock

    def reserve(self, task: str, batch_size: int | None, whole_device: int) -> int:
        """Bytes an ``auto`` task reserves now: learned (with headroom), else a whole device."""
        peak = self.peaks.get(task)
        if peak is None:
            return whole_device
        return math.ceil(peak * (batch_size or 1) * HEADROOM)

    def learn(self, task: str, peak: int | None) -> None:
        """Record one observed peak (``None``: the device cannot measure it, so nothing is reserved)."""
        self.peaks[task] = max(self.peaks.get(task, 0), int(peak or 0))

    def cap(self, task: str, device: str, size: int) -> int:
        """Items in the next batch of ``task`` on ``device``: ``size``, or less after an OOM split there (grown
        back by the quiet periods that passed since)."""
        key = (task, device)
        cap = self.caps.get(key)
        if cap is None:
            return size
        if self.quiet > 0:
            now = self.clock()
            while cap < size and now - self.since[key] >= self.quiet:
                cap = min(size, cap * 2)
                self.since[key] += self.quiet
                logger.info("celery-gpu: no out-of-memory split of %s on %s for %gs: its batches there may hold "
                            "%d items again", task, device, self.quiet, cap)
            if cap >= size:
                del self.caps[key], self.since[key]
                return size
            self.caps[key] = cap
        return min(size, cap)

    def fit(self, task: str, device: str, items: int) -> None:
        """A split on ``device`` found that ``items`` items of ``task`` fit in one call."""
        if items >= 1:
            self.caps[(task, device)] = items
            self.since[(task, device)] = self.clock()

    def info(self) -> MemoryInfo:
        """Plain data for ``inspect stats`` and ``celery-gpu status``."""
        return {
            "learned_peaks": dict(self.peaks),
            "batch_caps": {f"{task}@{device}": n for (task, device), n in sorted(self.caps.items())},
        }
