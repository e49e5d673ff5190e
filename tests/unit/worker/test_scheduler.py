"""The flush policy and placement, against the scheduler alone: no pool, no pipes, no processes.

What is checked: a free worker flushes at once; items are held while another process is busy, until the
batch is full or ``max_wait`` passes; the oldest waiting work goes first across tasks; the waiting queues are
FIFO per task; memory declarations are never oversubscribed and a task that can never fit is refused.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pytest

from celery_gpu.devices import Device
from celery_gpu.errors import InsufficientDeviceMemory, UnknownModel
from celery_gpu.tasks.batched import BatchOptions
from celery_gpu.worker.scheduler import LEAD, BatchQueues, Scheduler
from celery_gpu.worker.work import Job

GiB = 1024**3
DEVICE = Device(0, "fake", "fake-0", 8 * GiB)
BATCH = BatchOptions(4, 0.05, lambda items: items, False)  # batch=4, max_wait_ms=50


@dataclass
class Place:
    """An idle device process, as the scheduler sees one."""

    index: int
    device: Device = field(default_factory=lambda: DEVICE)
    idle_since: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"{self.device.label}#{self.index}"


_seq = iter(range(1, 1 << 30))


def job(name: str = "double", batch: BatchOptions | None = BATCH, memory: int = GiB) -> Job:
    args = (name, uuid.uuid4().hex, {"id": "x"}, b"[]", "application/json", "utf-8")
    return Job(next(_seq), args, memory, None, None, None, None, None, None, batch)


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler([DEVICE])


class Holds(list[float]):
    """The deadlines the scheduler asked to be woken at."""

    def __call__(self, when: float) -> None:
        self.append(when)


def test_free_worker_flushes_a_single_item_at_once(scheduler: Scheduler) -> None:
    a, b = Place(0), Place(1)
    item = job()
    scheduler.add(item)
    picked = scheduler.pick([a, b], busy=False, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.batched and picked.jobs == [item]
    assert picked.place in (a, b)
    assert len(scheduler) == 0


def test_items_are_held_while_another_process_is_busy_until_the_batch_is_full(scheduler: Scheduler) -> None:
    a, b = Place(0), Place(1)
    scheduler.add(job())
    first = scheduler.pick([a, b], busy=False, now=time.monotonic(), hold=Holds())
    assert first is not None  # takes one process; the other stays idle
    held = [job() for _ in range(3)]
    for item in held:
        scheduler.add(item)
    holds = Holds()
    now = time.monotonic()
    assert scheduler.pick([b], busy=True, now=now, hold=holds) is None, \
        "a partial batch must wait while the other process is busy"
    assert holds and 0 < holds[0] - now <= 0.05  # woken at the oldest item's deadline
    scheduler.add(job())  # the fourth waiting item fills the batch (batch=4): it leaves now
    full = scheduler.pick([b], busy=True, now=time.monotonic(), hold=Holds())
    assert full is not None and len(full.jobs) == 4 and full.jobs[:3] == held


def test_a_held_batch_leaves_after_max_wait(scheduler: Scheduler) -> None:
    b = Place(1)
    waiting = job()
    scheduler.add(waiting)
    assert scheduler.pick([b], busy=True, now=time.monotonic(), hold=Holds()) is None
    waiting.arrived -= 1.0  # an item that has waited longer than max_wait (50 ms)
    picked = scheduler.pick([b], busy=True, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.jobs == [waiting]


def test_oldest_waiting_work_goes_first_across_tasks(scheduler: Scheduler) -> None:
    square = job("square", memory=0)
    plain = job("plain", batch=None, memory=0)
    double = job("double")
    for item in (square, plain, double):
        scheduler.add(item)
    square.arrived -= 1.0  # past max_wait: not held
    first = scheduler.pick([Place(0)], busy=True, now=time.monotonic(), hold=Holds())
    assert first is not None and [j.name for j in first.jobs] == ["square"]
    second = scheduler.pick([Place(1)], busy=True, now=time.monotonic(), hold=Holds())
    assert second is not None and [j.name for j in second.jobs] == ["plain"]


def test_declared_memory_is_reserved_per_device_and_never_oversubscribed(scheduler: Scheduler) -> None:
    big = [job("plain", batch=None, memory=5 * GiB) for _ in range(2)]
    for item in big:
        scheduler.add(item)
    first = scheduler.pick([Place(0), Place(1)], busy=False, now=time.monotonic(), hold=Holds())
    assert first is not None
    scheduler.reserve(DEVICE, first.jobs[0].memory)
    assert scheduler.reserved[DEVICE.label] == 5 * GiB
    assert scheduler.pick([Place(1)], busy=True, now=time.monotonic(), hold=Holds()) is None, "3 GiB left"
    scheduler.reserved[DEVICE.label] -= 5 * GiB
    assert scheduler.pick([Place(1)], busy=True, now=time.monotonic(), hold=Holds()) is not None


def test_a_task_larger_than_every_device_is_refused(scheduler: Scheduler) -> None:
    assert scheduler.too_big(job(memory=8 * GiB)) is None
    error = scheduler.too_big(job(memory=9 * GiB))
    assert error is not None and "route it to a worker with bigger GPUs" in str(error)


def test_a_quarantined_device_gives_back_what_no_other_device_can_hold() -> None:
    small = Device(1, "fake", "fake-1", 2 * GiB)
    scheduler = Scheduler([DEVICE, small])
    fits, too_big = job("plain", batch=None, memory=GiB), job("plain", batch=None, memory=4 * GiB)
    scheduler.add(fits)
    scheduler.add(too_big)
    assert scheduler.quarantine(DEVICE, "setup failed") == [too_big]
    assert [d.label for d in scheduler.live()] == ["fake:1"] and list(scheduler.pending) == [fits]


def test_a_job_placed_elsewhere_than_where_it_died() -> None:
    scheduler = Scheduler([DEVICE])
    again = job("plain", batch=None, memory=0)
    again.deaths.append(("fake:0#0", "fake:0#0 pid 1: signal 9"))
    scheduler.add(again)
    picked = scheduler.pick([Place(0), Place(1)], busy=False, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.place.label == "fake:0#1"


# -- the waiting queues ----------------------------------------------------------------------------------------


def test_batcher_is_fifo_per_task_and_puts_back_in_order() -> None:
    b = BatchQueues()
    a = [job("a") for _ in range(5)]
    for j in a:
        b.add(j)
    b.add(x := job("x"))
    assert b.waiting() == {"a": 5, "x": 1} and len(b) == 6
    assert [(n, h) for n, _, h in b.heads()] == [("a", a[0]), ("x", x)]
    taken = b.take("a", 3)
    assert taken == a[:3]
    b.put_back(taken[1:])
    assert list(b.queues["a"]) == [a[1], a[2], a[3], a[4]]
    assert b.remove_if(lambda j: j is a[3]) == [a[3]]
    assert b.take("a", 10) == [a[1], a[2], a[4]] and b.waiting() == {"x": 1}


def test_waiting_items_and_item_memory_per_task(scheduler: Scheduler) -> None:
    for _ in range(3):
        scheduler.add(job("double", memory=4 * GiB))  # batch=4: 1 GiB per item
    scheduler.add(job("plain", batch=None, memory=GiB))
    auto = job("learned", batch=None, memory=0)
    auto.auto = True
    scheduler.add(auto)
    assert scheduler.waiting() == {"double": 3, "plain": 1, "learned": 1}
    assert scheduler.item_memory() == {"double": GiB, "learned": None, "plain": GiB}
    scheduler.book.learn("learned", 300)
    assert scheduler.item_memory()["learned"] == 300


# -- models: placement by residency, the budget, the mirror ------------------------------------------------------


def modeled(name: str, model: str, memory: int = GiB) -> Job:
    item = job(name, batch=None, memory=memory)
    item.model = model
    return item


def model_scheduler(**sizes: int | None) -> Scheduler:
    from celery_gpu.models import ModelSpec
    from celery_gpu.worker.residency import Residency

    specs = {n: ModelSpec(n, lambda device: None, s) for n, s in sizes.items()}
    return Scheduler([DEVICE], models=Residency(specs))


def test_a_task_goes_where_its_model_is_loaded_when_that_process_is_free() -> None:
    scheduler = model_scheduler(bert=3 * GiB)
    a, b = Place(0, idle_since=0.0), Place(1, idle_since=1.0)  # a is idle the longest: it wins without affinity
    scheduler.models.report("fake:0", b.label, [("bert", 3 * GiB)], ["bert"], [])
    scheduler.add(task := modeled("embed", "bert"))
    picked = scheduler.pick([a, b], busy=False, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.place is b and picked.jobs == [task]
    scheduler.add(modeled("embed", "bert"))
    picked = scheduler.pick([a], busy=True, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.place is a, "the holder is busy: another process loads it"


def test_models_of_other_processes_count_against_the_device_and_a_process_may_evict_its_own() -> None:
    scheduler = model_scheduler(bert=3 * GiB, llama=5 * GiB)
    a, b = Place(0), Place(1)
    scheduler.models.report("fake:0", a.label, [("llama", 5 * GiB)], ["llama"], [])
    # On b: 8 GiB less a's llama (5) less bert (3) leaves 0 for the task's own 1 GiB; on a: llama can go.
    assert scheduler.room(b, "bert") == 0 and scheduler.room(a, "bert") == 5 * GiB
    scheduler.add(modeled("embed", "bert"))
    picked = scheduler.pick([b, a], busy=False, now=time.monotonic(), hold=Holds())
    assert picked is not None and picked.place is a
    scheduler.reserve(DEVICE, GiB)
    budget = scheduler.budget(a)
    assert budget == 7 * GiB  # 8 less the task's 1 GiB; b holds nothing
    scheduler.models.dispatch(a.label, "bert", budget)  # the mirror: llama (5) + bert (3) > 7, llama goes
    assert scheduler.models.slots[a.label].items() == [("bert", 3 * GiB)]
    assert scheduler.held(DEVICE) == 4 * GiB


def test_a_model_that_can_never_fit_and_an_undeclared_one_fail_by_name() -> None:
    scheduler = model_scheduler(huge=8 * GiB, bert=GiB)
    error = scheduler.too_big(modeled("generate", "huge", memory=GiB))
    assert isinstance(error, InsufficientDeviceMemory) and "plus model 'huge'" in str(error)
    assert scheduler.too_big(modeled("embed", "bert")) is None
    unknown = scheduler.too_big(modeled("embed", "gpt"))
    assert isinstance(unknown, UnknownModel)


def test_an_undeclared_size_is_learned_from_what_a_process_reports() -> None:
    scheduler = model_scheduler(measured=None)
    assert scheduler.models.size("measured") == 0
    scheduler.models.report("fake:0", "fake:0#0", [("measured", 123)], ["measured"], [])
    assert scheduler.models.size("measured") == 123
    assert scheduler.models.info("fake:0") == {"measured": {"resident_bytes": 123, "loads": 1, "evictions": 0}}
    scheduler.models.clear("fake:0#0")
    assert scheduler.held(DEVICE) == 0


def test_work_waits_a_moment_for_the_busy_process_that_holds_its_model() -> None:
    scheduler = model_scheduler(bert=3 * GiB)
    scheduler.model_wait = 0.5
    busy_holder, free = Place(0), Place(1)
    scheduler.models.report("fake:0", busy_holder.label, [("bert", 3 * GiB)], ["bert"], [])
    scheduler.add(task := modeled("embed", "bert"))
    holds = Holds()
    assert scheduler.pick([free], busy=True, now=task.arrived + 0.1, hold=holds) is None
    assert holds == [task.arrived + 0.5]
    picked = scheduler.pick([busy_holder, free], busy=False, now=task.arrived + 0.2, hold=Holds())
    assert picked is not None and picked.place is busy_holder, "the holder is free again: it runs there"
    scheduler.add(late := modeled("embed", "bert"))
    picked = scheduler.pick([free], busy=True, now=late.arrived + 0.5, hold=Holds())
    assert picked is not None and picked.place is free, "waited long enough: another process loads it too"


# -- priorities and deadlines ------------------------------------------------------------------------------------


def urgent(name: str = "double", priority: int | None = None, expires_in: float | None = None,
           batch: BatchOptions | None = BATCH, arrived: float | None = None) -> Job:
    request: dict[str, object] = {"id": "x", "delivery_info": {"priority": priority}}
    if expires_in is not None:
        from datetime import datetime, timedelta, timezone

        request["expires"] = (datetime.now(timezone.utc) + timedelta(seconds=expires_in)).isoformat()
    args = (name, uuid.uuid4().hex, request, b"[]", "application/json", "utf-8")
    item = Job(next(_seq), args, 0, None, None, None, None, None, None, batch)
    if arrived is not None:
        item.arrived = arrived
    return item


def test_higher_priority_items_join_batches_first_in_the_brokers_order() -> None:
    now = time.monotonic()
    # RabbitMQ, then Redis (where a message without a priority is in kombu's priority-0 list: the first served)
    for lower_first, want in ((False, [9, 9, 5, 0]), (True, [0, 0, 0, 5])):
        scheduler = Scheduler([DEVICE])
        scheduler.lower_first = lower_first
        for i, level in enumerate([0, 9, 5, 0, 9, None]):
            scheduler.add(urgent(priority=level, arrived=now + i * 0.001))
        picked = scheduler.pick([Place(0)], busy=False, now=now + 0.01, hold=Holds())
        assert picked is not None and [j.priority() for j in picked.jobs] == want, lower_first


def test_aging_low_priority_is_not_overtaken_by_work_that_arrived_long_after_it() -> None:
    scheduler = Scheduler([DEVICE])
    scheduler.aging = 0.1  # one level is worth 100 ms of waiting
    now = time.monotonic()
    old_low = urgent(priority=0, arrived=now - 1.0)  # waited 1 s
    new_high = urgent(priority=9, arrived=now)  # 9 levels = 0.9 s: not enough to pass 1 s
    mid_high = urgent(priority=9, arrived=now - 0.2)  # arrived 0.8 s after old_low: passes it
    for item in (old_low, new_high, mid_high):
        scheduler.add(item)
    order = list(scheduler.queues.queues["double"].ordered())
    assert order == [mid_high, old_low, new_high]


def test_the_most_urgent_work_goes_first_across_tasks() -> None:
    scheduler = Scheduler([DEVICE])
    now = time.monotonic()
    scheduler.add(low := urgent("square", priority=0, arrived=now - 0.5))
    scheduler.add(high := urgent("plain", priority=9, batch=None, arrived=now))
    first = scheduler.pick([Place(0)], busy=False, now=now, hold=Holds())
    assert first is not None and first.jobs == [high]
    second = scheduler.pick([Place(0)], busy=False, now=now, hold=Holds())
    assert second is not None and second.jobs == [low]


def test_a_held_batch_leaves_in_time_for_its_earliest_deadline() -> None:
    scheduler = Scheduler([DEVICE])
    slow = BatchOptions(4, 1.0, lambda items: items, False)  # max_wait 1 s
    now = time.monotonic()
    scheduler.add(urgent(batch=slow, arrived=now), now=now)
    scheduler.add(tight := urgent(batch=slow, expires_in=0.2, arrived=now), now=now)
    assert tight.deadline is not None and abs(tight.deadline - (now + 0.2)) < 0.01
    holds = Holds()
    assert scheduler.pick([Place(1)], busy=True, now=now, hold=holds) is None
    assert holds and abs(holds[0] - (tight.deadline - LEAD)) < 1e-6, "the deadline wins over max_wait"
    picked = scheduler.pick([Place(1)], busy=True, now=tight.deadline - LEAD, hold=Holds())
    assert picked is not None and tight in picked.jobs


def test_an_item_whose_deadline_passes_while_it_waits_is_taken_out_and_never_batched() -> None:
    scheduler = Scheduler([DEVICE])
    now = time.monotonic()
    keep = [urgent(arrived=now) for _ in range(2)]
    gone = urgent(expires_in=0.05, arrived=now)
    own = urgent(arrived=now)
    own.max_age = 0.1  # the task's deadline_ms: 100 ms after its arrival
    for item in (keep[0], gone, own, keep[1]):
        scheduler.add(item, now=now)
    assert scheduler.next_deadline() == pytest.approx(now + 0.05, abs=0.01)
    assert scheduler.expire_due(now + 0.01) == []
    assert scheduler.expire_due(now + 0.06) == [gone]
    assert scheduler.next_deadline() == pytest.approx(now + 0.1)
    assert scheduler.expire_due(now + 0.2) == [own] and scheduler.next_deadline() is None
    assert len(scheduler) == 2
    picked = scheduler.pick([Place(0)], busy=False, now=now + 0.2, hold=Holds())
    assert picked is not None and picked.jobs == keep


def test_put_back_items_keep_their_deadline_and_go_first() -> None:
    scheduler = Scheduler([DEVICE])
    now = time.monotonic()
    first, second = urgent(expires_in=5.0, arrived=now), urgent(arrived=now)
    scheduler.add(first, now=now)
    scheduler.add(second, now=now)
    taken = scheduler.pick([Place(0)], busy=False, now=now, hold=Holds())
    assert taken is not None and taken.jobs == [first, second]
    scheduler.add(later := urgent(priority=9, arrived=now + 1))
    scheduler.requeue(taken.jobs)
    assert list(scheduler.queues.queues["double"].ordered()) == [first, second, later]
    assert scheduler.next_deadline() == first.deadline
