"""What the pool learns about tasks' device memory: ``memory="auto"`` peaks, and batch sizes that fit.

* ``memory="auto"``: until a task's peak has been seen, each of its runs reserves a whole device (it runs
  alone there); after that it reserves its largest observed peak plus :data:`HEADROOM`. A batched task's
  peak is kept per item and scaled to its full batch size. On a device that cannot measure peaks (the CPU)
  an ``auto`` task reserves nothing once it has run.
* Out-of-memory splits: the largest batch that fit on a device (reported by the device process after a
  split) caps the batches the pool forms for that task on that device from then on.
"""

from __future__ import annotations

import math

from ..observe.snapshot import MemoryInfo

__all__ = ["HEADROOM", "MemoryBook"]

#: Margin over the largest observed peak that ``memory="auto"`` reserves.
HEADROOM = 1.2


class MemoryBook:
    """Learned peaks per task and batch-size caps per (task, device); owned by the pool's loop thread."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}  # task name -> bytes of one call (plain) or one item (batched)
        self.caps: dict[tuple[str, str], int] = {}  # (task name, device label) -> largest batch that fit

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
        """Items in the next batch of ``task`` on ``device``: ``size``, or less after an OOM split there."""
        return min(size, self.caps.get((task, device), size))

    def fit(self, task: str, device: str, items: int) -> None:
        """A split on ``device`` found that ``items`` items of ``task`` fit in one call."""
        if items >= 1:
            self.caps[(task, device)] = items

    def info(self) -> MemoryInfo:
        """Plain data for ``inspect stats`` and ``celery-gpu status``."""
        return {
            "learned_peaks": dict(self.peaks),
            "batch_caps": {f"{task}@{device}": n for (task, device), n in sorted(self.caps.items())},
        }
