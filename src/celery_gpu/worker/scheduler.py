"""What runs next, and where: the pool's waiting work, its placement on idle device processes, the flush
policy of batches and the memory ledger of each device. No process is involved here: the pool hands the
scheduler its idle slots and starts what it picks.

The flush policy (see docs/design.md):

* a device process is free and items are waiting, and no device process is busy → the batch leaves at once
  (no added latency at low load);
* while other device processes are busy, a batch that is not full waits to fill, but never longer than its
  task's ``max_wait_ms`` counted from its oldest item;
* a batch holds at most the task's ``batch`` items (fewer on a device where it ran out of memory); across
  tasks (and plain GPU tasks) the work whose oldest item has waited longest goes first, so no task starves.

Placement: an idle slot whose device has the work's declared memory free (declarations in flight are summed
per device, with the models its *other* processes hold and the work's own model; a slot's own other models can
be evicted), preferring a slot the work has not died in, then one that already holds the work's model, then the
device with the most free memory, then the slot idle the longest. A plain task skips ahead only when the one
before it does not fit anywhere yet. What a slot's models may hold while it runs (its budget) is what is left.
Work whose model only a busy process holds waits for it up to ``model_wait`` seconds from its arrival (a
model load costs seconds; a process usually frees up in milliseconds), then goes anywhere it fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from ..devices import Device
from ..errors import InsufficientDeviceMemory, UnknownModel
from ..observe.snapshot import BatchingInfo
from .admission import MemoryBook
from .residency import Residency
from .work import Job

if TYPE_CHECKING:
    from .process import Slot
    from .work import Work

__all__ = ["BatchQueues", "Pick", "Place", "Scheduler"]


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


class BatchQueues:
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

    def remove_if(self, pred: Callable[[Job], bool]) -> list[Job]:
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


class Scheduler:
    """The pool's waiting work and devices' memory; owned by the pool's loop thread."""

    def __init__(self, devices: list[Device], book: MemoryBook | None = None,
                 models: Residency | None = None) -> None:
        self.devices = devices
        self.models = models or Residency()
        self.model_wait = 0.0  # seconds work waits for a busy process holding its model (settings.model_wait)
        self.pending: deque[Job] = deque()  # plain GPU tasks, FIFO
        self.queues = BatchQueues()  # items of batched tasks, FIFO per task
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
        too_big = [j for j in self.pending if j.memory + self.models.size(j.model) > biggest]
        for job in too_big:
            self.pending.remove(job)
        return too_big + self.queues.remove_if(lambda j: j.memory + self.models.size(j.model) > biggest)

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

    def add(self, job: Job) -> None:
        """Queue a task (an item of a batched task joins its task's queue)."""
        if job.name not in self._kinds:
            self._kinds[job.name] = (job.memory, job.batch.size if job.batch else None, job.auto)
        if job.batch is not None:
            self.queues.add(job)
        else:
            self.pending.append(job)

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs that did not run (or must run again) back at the front of their queues, in their order."""
        self.pending.extendleft(reversed([job for job in jobs if job.batch is None]))
        self.queues.put_back([job for job in jobs if job.batch is not None])

    def __len__(self) -> int:
        return len(self.pending) + len(self.queues)

    # -- choosing ------------------------------------------------------------------------------------------------

    def pick(self, idle: Sequence[P], busy: bool, now: float, hold: Callable[[float], None]) -> Pick[P] | None:
        """The work to start now and where: the oldest waiting work that fits an idle slot wins. While some
        process is ``busy``, a batch that is not full is held until its deadline, which is passed to ``hold``."""
        best: tuple[float, P, Job | str] | None = None
        for job in self.pending:  # the first plain task that fits (one that does not fit yet may be skipped)
            if self._waits_for_holder(job, idle, now, hold):
                continue
            place = self.place(self.need(job), idle, job.avoid, job.model)
            if place is not None:
                best = (job.arrived, place, job)
                break
        for name, head, waiting in self.queues.heads():
            assert head.batch is not None
            if busy and not head.isolate and waiting < head.batch.size and now - head.arrived < head.batch.max_wait:
                hold(head.arrived + head.batch.max_wait)
                continue
            if (best is not None and best[0] <= head.arrived) or self._waits_for_holder(head, idle, now, hold):
                continue
            place = self.place(self.need(head), idle, head.avoid, head.model)
            if place is not None:
                best = (head.arrived, place, name)
        if best is None:
            return None
        _, place, what = best
        if isinstance(what, Job):
            self.pending.remove(what)
            return Pick(place, [what], False)
        head = self.queues.queues[what][0]
        assert head.batch is not None
        jobs = self.queues.take(what, self.book.cap(what, place.device.label, head.batch.size))
        for job in jobs:
            job.memory = head.memory  # one task: one declaration (learned ones may have changed meanwhile)
        return Pick(place, jobs, True)

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
        for job in self.pending:
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
