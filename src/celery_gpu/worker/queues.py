"""Work waiting in the pool, in the order it leaves: most urgent first, then first come.

Each waiting job has a *key*: the time it arrived in the pool, moved earlier by its Celery priority (aging, see
:mod:`.scheduler`), so that sorting by key is "most urgent first, and within a level first come". Jobs put back
(they did not run, or must run again after their process died) go before everything else of their queue, in
their order. A :class:`WaitQueue` keeps three views of the same jobs, each a heap or deque with lazy deletion (a
job taken or expired is skipped when met): by key (what leaves next), by arrival (the oldest, whose ``max_wait``
bounds how long a batch is held), and by deadline (the earliest ``expires``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from .work import Job

__all__ = ["BatchQueues", "WaitQueue"]

_entries = itertools.count(1)


def _live(job: Job, entry: int) -> bool:
    return job.waiting and job.entry == entry


class WaitQueue:
    """Jobs waiting in one queue (the plain tasks, or the items of one batched task)."""

    def __init__(self) -> None:
        self._order: list[tuple[int, float, int, Job]] = []  # (0: put back | 1, key, entry, job)
        self._arrival: deque[tuple[int, Job]] = deque()  # (entry, job), oldest first
        self._deadlines: list[tuple[float, int, Job]] = []  # (deadline, entry, job)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def push(self, job: Job) -> None:
        """Queue ``job`` by its key."""
        self._push(job, 1)
        self._arrival.append((job.entry, job))

    def push_front(self, jobs: list[Job]) -> None:
        """Put ``jobs`` back before every job that was not put back, in their order (and as the oldest)."""
        for job in jobs:
            self._push(job, 0)
        self._arrival.extendleft((job.entry, job) for job in reversed(jobs))

    def _push(self, job: Job, tier: int) -> None:
        job.entry, job.waiting = next(_entries), True
        heapq.heappush(self._order, (tier, job.key, job.entry, job))
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, job.entry, job))
        self._count += 1

    def discard(self, job: Job) -> None:
        """``job`` leaves the queue (taken, expired, removed); its entries are skipped from now on."""
        if job.waiting:
            job.waiting = False
            self._count -= 1

    def peek(self) -> Job | None:
        """The job that leaves next, or None."""
        order = self._order
        while order and not _live(order[0][3], order[0][2]):
            heapq.heappop(order)
        return order[0][3] if order else None

    def pop(self) -> Job | None:
        """Remove and return the job that leaves next."""
        job = self.peek()
        if job is not None:
            heapq.heappop(self._order)
            self.discard(job)
        return job

    def oldest(self) -> Job | None:
        """The job that arrived first (put-back jobs count as the oldest)."""
        arrival = self._arrival
        while arrival and not _live(arrival[0][1], arrival[0][0]):
            arrival.popleft()
        return arrival[0][1] if arrival else None

    def earliest_deadline(self) -> float | None:
        """The earliest deadline of a waiting job, or None."""
        deadlines = self._deadlines
        while deadlines and not _live(deadlines[0][2], deadlines[0][1]):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def ordered(self) -> Iterator[Job]:
        """Every waiting job, in the order they leave (a sorted copy: for the rare walk past the first)."""
        for _, _, entry, job in sorted(self._order, key=lambda e: e[:3]):
            if _live(job, entry):
                yield job

    def __iter__(self) -> Iterator[Job]:
        return self.ordered()

    def remove(self, job: Job) -> None:
        """Remove a waiting job (``ValueError`` if it does not wait here)."""
        if not job.waiting:
            raise ValueError(f"{job.task_id} is not waiting")
        self.discard(job)

    def remove_if(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove and return every waiting job for which ``pred(job)`` is true, in their order."""
        removed = [job for job in self.ordered() if pred(job)]
        for job in removed:
            self.discard(job)
        return removed


class BatchQueues:
    """Waiting items of batched tasks: one :class:`WaitQueue` per task name."""

    def __init__(self) -> None:
        self.queues: dict[str, WaitQueue] = {}

    def queue(self, name: str) -> WaitQueue:
        """The queue of task ``name`` (made on first use)."""
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = WaitQueue()
        return queue

    def add(self, job: Job) -> None:
        """Queue an item."""
        self.queue(job.name).push(job)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def heads(self) -> Iterator[tuple[str, WaitQueue, Job]]:
        """``(task name, its queue, the item that leaves next)`` for every task with items waiting."""
        for name, q in self.queues.items():
            head = q.peek()
            if head is not None:
                yield name, q, head

    def take(self, name: str, n: int, usable: Callable[[Job], bool] = lambda job: True) -> list[Job]:
        """Remove and return up to ``n`` of the next items of ``name`` for which ``usable(job)`` (those that are
        not are removed and dropped: the caller ended them); an isolated item leaves alone."""
        q = self.queues[name]
        taken: list[Job] = []
        while len(taken) < n:
            job = q.peek()
            if job is None or (job.isolate and taken):
                break
            q.pop()
            if not usable(job):
                continue
            taken.append(job)
            if job.isolate:
                break
        return taken

    def put_back(self, jobs: list[Job]) -> None:
        """Return unsent items to the front of their queue, in their order."""
        by_task: dict[str, list[Job]] = {}
        for job in jobs:
            by_task.setdefault(job.name, []).append(job)
        for name, mine in by_task.items():
            self.queue(name).push_front(mine)

    def remove_if(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove and return every waiting item for which ``pred(job)`` is true."""
        return [job for q in self.queues.values() for job in q.remove_if(pred)]

    def waiting(self) -> dict[str, int]:
        """Items waiting per task."""
        return {name: len(q) for name, q in self.queues.items() if q}
