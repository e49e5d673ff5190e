"""Forming batches in the worker's main process: waiting items per batched task, and when a batch leaves.

The flush policy (see docs/design.md):

* a device process is free and items are waiting, and no device process is busy → the batch leaves at once
  (no added latency at low load);
* while other device processes are busy, a batch that is not full waits to fill, but never longer than its
  task's ``max_wait_ms`` counted from its oldest item;
* a batch holds at most the task's ``batch`` items; across tasks (and plain GPU tasks) the work whose oldest
  item has waited longest goes first, so no task starves.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Iterator
from typing import Any

from .slots import Job

__all__ = ["Batch", "Batcher"]


class Batch:
    """Items of one batched task sent to one device process together; each item keeps its own :class:`Job`."""

    def __init__(self, seq: int, jobs: list[Job]) -> None:
        self.seq = seq
        self.jobs = jobs
        self.name = jobs[0].name
        self.task_id = f"{jobs[0].task_id} +{len(jobs) - 1} more" if len(jobs) > 1 else jobs[0].task_id
        self.memory = max(j.memory for j in jobs)  # a batched task declares the memory of one call
        softs = [j.soft for j in jobs if j.soft]
        hards = [j.hard for j in jobs if j.hard]
        self.soft: float | None = max(softs) if softs else None  # the call runs under its items' longest limit
        self.hard: float | None = max(hards) if hards else None
        self.slot: Any = None
        self.started = 0.0
        self.soft_sent = False
        self.finished = False

    @property
    def terminated(self) -> int | None:
        """The signal when every item was revoked with terminate (then the process is killed), else None."""
        sigs = [j.terminated for j in self.jobs]
        return sigs[0] if sigs and all(s is not None for s in sigs) else None

    def frame(self) -> dict[str, Any]:
        """The ``batch`` frame sent to a device process."""
        return {"t": "batch", "job": self.seq, "name": self.name, "items": [j.item() for j in self.jobs]}

    def terminate(self, signum: int | None = None) -> None:
        """Terminate every item."""
        for j in self.jobs:
            j.terminated = int(signum or signal.SIGTERM)


class Batcher:
    """Waiting items of batched tasks: one FIFO per task name."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Job]] = {}

    def add(self, job: Job) -> None:
        """Queue an item."""
        self.queues.setdefault(job.name, deque()).append(job)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def heads(self) -> Iterator[tuple[str, Job, int]]:
        """``(task name, oldest item, items waiting)`` for every task with items waiting."""
        for name, q in self.queues.items():
            if q:
                yield name, q[0], len(q)

    def take(self, name: str, n: int) -> list[Job]:
        """Remove and return up to ``n`` of the oldest items of ``name``; an isolated item leaves alone."""
        q = self.queues[name]
        if q and q[0].isolate:
            return [q.popleft()]
        taken: list[Job] = []
        while q and len(taken) < n and not q[0].isolate:
            taken.append(q.popleft())
        return taken

    def put_back(self, jobs: list[Job]) -> None:
        """Return unsent items to the front of their queue, in their order."""
        for job in reversed(jobs):
            self.queues.setdefault(job.name, deque()).appendleft(job)

    def remove_if(self, pred: Any) -> list[Job]:
        """Remove and return every waiting item for which ``pred(job)`` is true."""
        removed: list[Job] = []
        for q in self.queues.values():
            keep = [j for j in q if not pred(j)]
            removed.extend(j for j in q if pred(j))
            q.clear()
            q.extend(keep)
        return removed

    def waiting(self) -> dict[str, int]:
        """Items waiting per task."""
        return {name: len(q) for name, q in self.queues.items() if q}
