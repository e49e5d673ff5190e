"""What runs next, and where: the pool's waiting work, its placement on idle device processes, the flush
policy of batches, deadlines and priorities, and the memory ledger of each device. No process is involved here:
the pool hands the scheduler its idle slots and starts what it picks.

Order (see docs/design.md): waiting work leaves most urgent first, then first come (:mod:`.queues`). An item's
*key* is when it arrived in the pool, moved ``priority_aging`` seconds earlier for each level of Celery priority
it has above the lowest: it goes ahead of lower-priority work that arrived up to that much before it, and never
further, so low-priority work waits at most (levels between them) x ``priority_aging`` behind later urgent work
(no starvation). Which way is "higher" is the broker's: on RabbitMQ (``x-max-priority``) a larger number is more
urgent, on Redis (kombu's priority steps) a smaller one, as the broker itself delivers them.

The flush policy:

* a device process is free and items are waiting, and no device process is busy → the batch leaves at once
  (no added latency at low load);
* while other device processes are busy, a batch that is not full waits to fill, but never past its task's
  ``max_wait_ms`` counted from its oldest item, nor past :data:`LEAD` before the earliest deadline of its items
  (an item's ``expires``, or the task's ``deadline_ms`` from its arrival): whichever comes first;
* a batch holds at most the task's ``batch`` items (fewer on a device where it ran out of memory), the most
  urgent first; across tasks (and plain GPU tasks) the most urgent work goes first.

Deadlines: an item whose deadline passes while it waits is taken out (:meth:`Scheduler.expire_due`) and ended by
the pool as Celery ends an expired task (REVOKED, ``task-revoked`` with ``expired=True``); it never reaches a batch.

Placement: an idle slot whose device has the work's declared memory free (declarations in flight are summed
per device, with the models its *other* processes hold and the work's own model; a slot's own other models can
be evicted), preferring a slot the work has not died in, then one that already holds the work's model, then the
device with the most free memory, then the slot idle the longest. A plain task skips ahead only when the one
before it does not fit anywhere yet. What a slot's models may hold while it runs (its budget) is what is left.
Work whose model only a busy process holds waits for it up to ``model_wait`` seconds from its arrival (a
model load costs seconds; a process usually frees up in milliseconds), then goes anywhere it fits.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from ..devices import Device
from ..errors import InsufficientDeviceMemory, UnknownModel
from ..observe.snapshot import BatchingInfo
from .admission import MemoryBook
from .queues import BatchQueues, WaitQueue
from .residency import Residency
from .work import Job

if TYPE_CHECKING:
    from .process import Slot
    from .work import Work

__all__ = ["LEAD", "BatchQueues", "Pick", "Place", "Scheduler"]

#: A held batch leaves this long before the earliest deadline of its items, so they start in time.
LEAD = 0.01


class Place(Protocol):
    """What the scheduler needs to know of an idle device process."""

    @property
    def label(self) -> str: ...

    @property
    def device(self) -> Device: ...

    @property
    def idle_since(self) -> float: ...


P = TypeVar("P", bound=Place)


@dataclass
class Pick(Generic[P]):
    """Work to start now: ``jobs`` (one plain task, or the items of one batch) on ``place``."""

    place: P
    jobs: list[Job]
    batched: bool


class Scheduler:
    """The pool's waiting work and devices' memory; owned by the pool's loop thread."""

    def __init__(self, devices: list[Device], book: MemoryBook | None = None,
                 models: Residency | None = None) -> None:
        self.devices = devices
        self.models = models or Residency()
        self.model_wait = 0.0  # seconds work waits for a busy process holding its model (settings.model_wait)
        self.pending = WaitQueue()  # plain GPU tasks
        self.queues = BatchQueues()  # items of batched tasks, one queue per task
        self.deadlines: list[tuple[float, int, Job]] = []  # (deadline, entry, job) of every waiting job that has one
        self.aging = 1.0  # seconds a job's key moves earlier per level of priority (settings.priority_aging)
        self.lower_first = False  # the broker's order: on Redis a smaller priority number is more urgent
        self.reserved = {d.label: 0 for d in devices}  # declared memory of the work running on each device
        self.quarantined: dict[str, str] = {}  # device label -> why it takes no more work
        self.book = book or MemoryBook()
        self._stats: dict[str, list[int]] = {}  # task name -> [batches, items, calls]
        self._kinds: dict[str, tuple[int, int | None, bool]] = {}  # task -> (declared memory, batch, auto)

    # -- devices -------------------------------------------------------------------------------------------------

    def live(self) -> list[Device]:
        """The devices that take work."""
        return [d for d in self.devices if d.label not in self.quarantined]

    def too_big(self, job: Job) -> Exception | None:
        """The error for a task that declares more memory (with its model's) than any working device has, or
        names a model no ``@gpu.model`` declares; else None."""
        if job.model is not None and not self.models.known(job.model):
            return UnknownModel(f"task {job.name} uses model {job.model!r}, which no @gpu.model declares here")
        live = self.live()
        biggest = max((d.total_memory for d in live), default=0)
        model = self.models.size(job.model)
        if live and job.memory + model > biggest:
            what = f" plus model {job.model!r} ({model} bytes)" if job.model else ""
            return InsufficientDeviceMemory(
                f"task {job.name} declares {job.memory} bytes of device memory{what}; the largest device of this "
                f"worker has {biggest}: route it to a worker with bigger GPUs")
        return None

    def held(self, device: Device) -> int:
        """Device memory taken on ``device``: the declarations of its running work and its processes' models."""
        return self.reserved[device.label] + self.models.on_device(device.label)

    def quarantine(self, device: Device, reason: str) -> list[Job]:
        """Take ``device`` out of service; the waiting tasks that no working device can hold now (removed)."""
        self.quarantined[device.label] = reason
        live = self.live()
        if not live:
            return []
        biggest = max(d.total_memory for d in live)
        return self.drop(lambda j: j.memory + self.models.size(j.model) > biggest)

    def reserve(self, device: Device, memory: int) -> None:
        """Work declaring ``memory`` started on ``device``."""
        self.reserved[device.label] += memory

    def release(self, slot: Slot) -> Work | None:
        """Detach ``slot``'s work, once: the work it ran (its declared memory returned to the device), or None."""
        work = slot.detach()
        if work is not None:
            self.reserved[slot.device.label] -= work.memory
        return work

    # -- waiting work --------------------------------------------------------------------------------------------

    def add(self, job: Job, now: float | None = None) -> None:
        """Queue a task (an item of a batched task joins its task's queue): its key (arrival moved earlier by
        its priority) and its deadline (``expires``, or the task's ``deadline_ms`` from its arrival)."""
        if job.name not in self._kinds:
            self._kinds[job.name] = (job.memory, job.batch.size if job.batch else None, job.auto)
        priority = job.priority()
        if priority:
            job.level = level = -priority if self.lower_first else priority  # larger: more urgent
            job.key = job.arrived - level * self.aging
        else:
            job.key = job.arrived
        if job.max_age is not None or job.request.get("expires"):
            job.deadline = job.deadline_from(time.monotonic() if now is None else now)
        if job.batch is not None:
            self.queues.add(job)
        else:
            self.pending.push(job)
        if job.deadline is not None:
            heapq.heappush(self.deadlines, (job.deadline, job.entry, job))

    def _watch(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.deadline is not None:
                heapq.heappush(self.deadlines, (job.deadline, job.entry, job))

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs that did not run (or must run again) back at the front of their queues, in their order."""
        self.pending.push_front([job for job in jobs if job.batch is None])
        self.queues.put_back([job for job in jobs if job.batch is not None])
        self._watch(jobs)

    def drop(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove and return every waiting job (plain task or batch item) for which ``pred(job)`` is true."""
        return self.pending.remove_if(pred) + self.queues.remove_if(pred)

    def expire_due(self, now: float) -> list[Job]:
        """Take out every waiting job whose deadline is ``now`` or earlier (the pool ends them as expired)."""
        due: list[Job] = []
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            _, entry, job = heapq.heappop(deadlines)
            if job.waiting and job.entry == entry:
                (self.queues.queues[job.name] if job.batch is not None else self.pending).discard(job)
                due.append(job)
        return due

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting job (when :meth:`expire_due` has work), or None."""
        deadlines = self.deadlines
        while deadlines and not (deadlines[0][2].waiting and deadlines[0][2].entry == deadlines[0][1]):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def __len__(self) -> int:
        return len(self.pending) + len(self.queues)

    # -- choosing ------------------------------------------------------------------------------------------------

    def pick(self, idle: Sequence[P], busy: bool, now: float, hold: Callable[[float], None]) -> Pick[P] | None:
        """The work to start now and where: the most urgent waiting work that fits an idle slot wins. While some
        process is ``busy``, a batch that is not full is held until it must leave, which is passed to ``hold``."""
        best: tuple[float, P, Job | str] | None = None
        plain = self._first_plain(idle, now, hold)
        if plain is not None:
            best = (plain[1].key, plain[0], plain[1])
        for name, queue, head in self.queues.heads():
            assert head.batch is not None
            if busy and not head.isolate and len(queue) < head.batch.size:
                leave = self._leave_at(queue, head.batch.max_wait)
                if now < leave:
                    hold(leave)
                    continue
            if (best is not None and best[0] <= head.key) or self._waits_for_holder(head, idle, now, hold):
                continue
            place = self.place(self.need(head), idle, head.avoid, head.model)
            if place is not None:
                best = (head.key, place, name)
        if best is None:
            return None
        _, place, what = best
        if isinstance(what, Job):
            self.pending.remove(what)
            return Pick(place, [what], False)
        first = self.queues.queues[what].peek()
        assert first is not None and first.batch is not None
        jobs = self.queues.take(what, self.book.cap(what, place.device.label, first.batch.size))
        for job in jobs:
            job.memory = first.memory  # one task: one declaration (learned ones may have changed meanwhile)
        return Pick(place, jobs, True)

    def _first_plain(self, idle: Sequence[P], now: float, hold: Callable[[float], None]) -> tuple[P, Job] | None:
        """The most urgent plain task that fits an idle slot now (one that does not fit yet may be skipped)."""
        head = self.pending.peek()
        if head is None:
            return None
        for job in self._plain_in_order(head):
            if self._waits_for_holder(job, idle, now, hold):
                continue
            place = self.place(self.need(job), idle, job.avoid, job.model)
            if place is not None:
                return place, job
        return None

    def _plain_in_order(self, head: Job) -> Iterator[Job]:
        yield head  # the usual case: the first fits, and the queue is never sorted
        yield from (job for job in self.pending.ordered() if job is not head)

    def _leave_at(self, queue: WaitQueue, max_wait: float) -> float:
        """When a held batch must leave: its oldest item's ``max_wait`` or :data:`LEAD` before the earliest
        deadline of its items, whichever comes first."""
        oldest = queue.oldest()
        leave = oldest.arrived + max_wait if oldest is not None else 0.0
        deadline = queue.earliest_deadline()
        return leave if deadline is None else min(leave, deadline - LEAD)

    def _waits_for_holder(self, job: Job, idle: Sequence[P], now: float, hold: Callable[[float], None]) -> bool:
        """Whether ``job`` waits for the busy process that holds its model (no idle one does), rather than load
        it a second time: for at most ``model_wait`` seconds from its arrival (passed to ``hold``)."""
        if job.model is None or now - job.arrived >= self.model_wait:
            return False
        if any(self.models.holds(s.label, job.model) for s in idle):
            return False
        if not self.models.held_anywhere(job.model):
            return False
        hold(job.arrived + self.model_wait)
        return True

    def need(self, job: Job) -> int:
        """Device memory ``job`` reserves now: declared, or for ``memory="auto"`` what has been learned."""
        if job.auto:
            whole = max((d.total_memory for d in self.live()), default=0)
            job.memory = self.book.reserve(job.name, job.batch.size if job.batch else None, whole)
        return job.memory

    def place(self, memory: int, idle: Sequence[P], avoid: set[str] | None = None,
              model: str | None = None) -> P | None:
        """Among idle slots with ``memory`` free for work that uses ``model``: one not in ``avoid`` (slots a task
        already died in), then one that holds ``model`` already, then the device with the most free memory, then
        the slot idle the longest (so work spreads over devices and processes)."""
        fits = [s for s in idle if self.room(s, model) >= memory]
        if not fits:
            return None
        return max(fits, key=lambda s: (s.label not in (avoid or ()), self.models.holds(s.label, model),
                                        self.room(s, model), -s.idle_since))

    def room(self, place: Place, model: str | None = None) -> int:
        """Bytes left on ``place``'s device for the work's own memory if it runs there with ``model`` loaded:
        what is not reserved by running work nor held by the models of the device's other processes."""
        return self.budget(place) - self.models.size(model)

    def budget(self, place: Place) -> int:
        """Bytes ``place``'s own models may hold: the device's memory less the running work's declarations and
        the models of its other processes (its budget, sent with the work)."""
        device = place.device
        return device.total_memory - self.reserved[device.label] - self.models.on_device(device.label, place.label)

    # -- batching statistics -------------------------------------------------------------------------------------

    def waiting(self) -> dict[str, int]:
        """Items (and plain tasks) waiting in the pool, per task."""
        counts = self.queues.waiting()
        for job in self.pending.ordered():
            counts[job.name] = counts.get(job.name, 0) + 1
        return counts

    def item_memory(self) -> dict[str, int | None]:
        """Per task seen: device bytes one item needs (a plain task: one call): its declaration ÷ ``batch``, or
        for ``memory="auto"`` the peak learned so far (None before one was seen)."""
        out: dict[str, int | None] = {}
        for name, (declared, size, auto) in sorted(self._kinds.items()):
            out[name] = self.book.peaks.get(name) if auto else -(-declared // (size or 1))
        return out

    def count_batch(self, name: str, items: int) -> None:
        """A batch of ``items`` items of ``name`` started."""
        stats = self._stats.setdefault(name, [0, 0, 0])
        stats[0] += 1
        stats[1] += items

    def count_calls(self, name: str, calls: int) -> None:
        """A batch of ``name`` ended after ``calls`` calls of its function."""
        self._stats.setdefault(name, [0, 0, 0])[2] += calls

    def batching(self) -> dict[str, BatchingInfo]:
        """Per batched task: batches run, items in them, calls made (bisection included), items waiting now."""
        waiting = self.queues.waiting()
        info: dict[str, BatchingInfo] = {}
        for name in sorted(set(self._stats) | set(waiting)):
            b, i, c = self._stats.get(name, (0, 0, 0))
            info[name] = {"batches": b, "items": i, "calls": c, "mean_batch": round(i / b, 2) if b else 0.0,
                          "waiting": waiting.get(name, 0)}
        return info
