"""Work waiting in the pool, in the order it leaves: most urgent first, then first come.

Each waiting job has a priority *level* and a *key*: the time it arrived in the pool, moved earlier by its level
(aging, see :mod:`.scheduler`), so that the smallest key leaves first. Jobs of one level arrive in key order, so
a :class:`WaitQueue` keeps one FIFO per level and compares only the heads of the levels present (usually one):
queueing and taking a job cost O(1), not a heap's O(log n). Jobs put back (they did not run, or must run again
after their process died) go before everything else of their queue, in their order. A job that leaves out of
order (expired, revoked, removed) is marked and skipped when its turn comes; deadlines are kept in a heap, for
the jobs that have one.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator

from .work import Job

__all__ = ["BatchQueues", "WaitQueue"]

_entries = itertools.count(1)
Entry = tuple[int, Job]  # (its entry number, the job): stale once the job left or was queued again


def _live(entry: Entry) -> bool:
    return entry[1].waiting and entry[1].entry == entry[0]


def _head(fifo: deque[Entry]) -> Job | None:
    while fifo and not _live(fifo[0]):
        fifo.popleft()
    return fifo[0][1] if fifo else None


class WaitQueue:
    """Jobs waiting in one queue (the plain tasks, or the items of one batched task)."""

    def __init__(self) -> None:
        self._front: deque[Entry] = deque()  # put back: they leave first, in this order
        self._levels: dict[int, deque[Entry]] = {}  # by priority level, first come first
        self._deadlines: list[tuple[float, int, Job]] = []  # (deadline, entry, job)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def push(self, job: Job) -> None:
        """Queue ``job`` behind the jobs of its level."""
        fifo = self._levels.get(job.level)
        if fifo is None:
            fifo = self._levels[job.level] = deque()
        fifo.append(self._enter(job))

    def push_front(self, jobs: list[Job]) -> None:
        """Put ``jobs`` back before every other job, in their order."""
        self._front.extendleft(reversed([self._enter(job) for job in jobs]))

    def _enter(self, job: Job) -> Entry:
        job.entry = entry = next(_entries)
        job.waiting = True
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, entry, job))
        self._count += 1
        return entry, job

    def discard(self, job: Job) -> None:
        """``job`` leaves the queue (taken, expired, removed); its entries are skipped from now on."""
        if job.waiting:
            job.waiting = False
            self._count -= 1

    def _next(self) -> tuple[Job, deque[Entry]] | None:
        job = _head(self._front)
        if job is not None:
            return job, self._front
        best: tuple[Job, deque[Entry]] | None = None
        for fifo in self._levels.values():
            head = _head(fifo)
            if head is not None and (best is None or (head.key, head.entry) < (best[0].key, best[0].entry)):
                best = head, fifo
        return best

    def peek(self) -> Job | None:
        """The job that leaves next, or None."""
        found = self._next()
        return found[0] if found is not None else None

    def pop(self) -> Job | None:
        """Remove and return the job that leaves next."""
        found = self._next()
        if found is None:
            return None
        job, fifo = found
        fifo.popleft()
        self.discard(job)
        return job

    def take(self, n: int) -> list[Job]:
        """Remove and return up to ``n`` jobs, in the order they leave; an isolated job leaves alone."""
        if len(self._levels) == 1 and _head(self._front) is None:
            return self._take_one_level(n, next(iter(self._levels.values())))
        taken: list[Job] = []
        while len(taken) < n:
            found = self._next()
            if found is None:
                break
            job, fifo = found
            if job.isolate and taken:
                break
            fifo.popleft()
            self.discard(job)
            taken.append(job)
            if job.isolate:
                break
        return taken

    def _take_one_level(self, n: int, fifo: deque[Entry]) -> list[Job]:
        """:meth:`take` when every job waits at one level (the usual case): straight from its FIFO."""
        taken: list[Job] = []
        while fifo and len(taken) < n:
            entry, job = fifo[0]
            if not (job.waiting and job.entry == entry):
                fifo.popleft()
                continue
            if job.deaths and taken:  # isolated: it leaves alone
                break
            fifo.popleft()
            job.waiting = False
            taken.append(job)
            if job.deaths:
                break
        self._count -= len(taken)
        return taken

    def oldest(self) -> Job | None:
        """The job waiting longest (put-back jobs count as the oldest)."""
        job = _head(self._front)
        if job is not None:
            return job
        heads = [head for fifo in self._levels.values() if (head := _head(fifo)) is not None]
        return min(heads, key=lambda j: (j.arrived, j.entry)) if heads else None

    def earliest_deadline(self) -> float | None:
        """The earliest deadline of a waiting job, or None."""
        deadlines = self._deadlines
        while deadlines and not _live((deadlines[0][1], deadlines[0][2])):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def ordered(self) -> Iterator[Job]:
        """Every waiting job, in the order they leave (sorts a copy: for the rare walk past the first)."""
        yield from (job for entry, job in list(self._front) if _live((entry, job)))
        rest = [e for fifo in self._levels.values() for e in fifo if _live(e)]
        yield from (job for _, job in sorted(rest, key=lambda e: (e[1].key, e[0])))

    def __iter__(self) -> Iterator[Job]:
        return self.ordered()

    def remove(self, job: Job) -> None:
        """Remove a waiting job (``ValueError`` if it does not wait)."""
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
        queue = self.queues.get(job.name)
        (queue if queue is not None else self.queue(job.name)).push(job)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def heads(self) -> Iterator[tuple[str, WaitQueue, Job]]:
        """``(task name, its queue, the item that leaves next)`` for every task with items waiting."""
        for name, q in self.queues.items():
            if q:
                head = q.peek()
                if head is not None:
                    yield name, q, head

    def take(self, name: str, n: int) -> list[Job]:
        """Remove and return up to ``n`` of the next items of ``name``; an isolated item leaves alone."""
        return self.queues[name].take(n)

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
