"""The supervisor's watchdogs driven directly on a pool with fake pipes (no processes): a setup that does not
finish in time, and a device taken out of service after repeated sticky errors."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.worker.pool import GPUPool
from tests.unit.worker.test_pool import FakeChan, FakeLoop, submit


class Chan(FakeChan):
    def close(self) -> None:
        pass


@pytest.fixture
def pool(make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch) -> GPUPool:
    monkeypatch.setenv("CELERY_GPU_DEVICES", "fake:2x8GiB")
    monkeypatch.setenv("CELERY_GPU_SETUP_TIMEOUT", "30")
    monkeypatch.setenv("CELERY_GPU_STICKY_LIMIT", "2")
    monkeypatch.setenv("CELERY_GPU_STICKY_WINDOW", "60")
    monkeypatch.setenv("CELERY_GPU_HEARTBEAT_TIMEOUT", "0")  # no pipes to read here
    app = make_app()
    gpu = GPU(app)

    @gpu.task(name="plain", shared=False)
    def plain(x: int) -> int:
        return x

    app.finalize()
    p = GPUPool(app=app, threads=False)
    p._loop = FakeLoop()  # type: ignore[assignment]
    for i, slot in enumerate(p.slots):
        slot.state, slot.chan, slot.pid = "idle", Chan(), 1000 + i  # type: ignore[assignment]
    return p


def test_a_setup_that_does_not_finish_in_time_marks_its_device_failed(pool: GPUPool) -> None:
    slow = pool.slots[1]
    slow.state, slow.spawned_at = "starting", time.monotonic()
    pool.supervisor.tick(time.monotonic() + 29)
    assert slow.state == "starting" and not pool.scheduler.quarantined
    pool.supervisor.tick(time.monotonic() + 31)
    assert slow.state == "failed"
    assert "setup did not finish within 30s" in pool.scheduler.quarantined["fake:1"]
    assert "fake:0" not in pool.scheduler.quarantined and pool.slots[0].state == "idle"
    assert pool.status()["devices"][1]["quarantined"]


def poison(pool: GPUPool, index: int) -> None:
    slot = pool.slots[index]
    slot.chan.inbox.append({"t": "poisoned", "error": "RuntimeError: CUDA error: an illegal memory access",  # type: ignore[union-attr]
                            "traceback": "tb"})
    pool.supervisor.on_readable(slot, slot.chan)  # type: ignore[arg-type]


def test_repeated_sticky_errors_take_the_device_out_of_service(pool: GPUPool) -> None:
    poison(pool, 1)
    assert not pool.scheduler.quarantined, "one sticky error only replaces the process"
    poison(pool, 0)  # another device: its own count
    assert not pool.scheduler.quarantined
    first = pool.supervisor.sticky["fake:1"][0]
    pool.supervisor.sticky["fake:1"][0] = (first[0] - 61, first[1])  # the first error of fake:1 leaves the window
    poison(pool, 1)
    assert not pool.scheduler.quarantined
    pool.slots[0].state = "busy"
    in_flight = submit(pool, "plain", 1)
    assert in_flight.accepted == [pool.slots[1].pid]
    poison(pool, 1)
    assert "2 sticky CUDA errors within 60s" in pool.scheduler.quarantined["fake:1"]
    assert pool.slots[1].state == "failed"
    counters = {d["device"]: d["counters"]["sticky_errors"] for d in pool.status()["devices"]}
    assert counters == {"fake:0": 1, "fake:1": 3}
    pool.slots[0].state = "idle"
    pool.supervisor.on_exit(pool.slots[1])  # the poisoned process exits: its task runs again on fake:0 at once
    assert pool.slots[1].state == "failed" and pool.slots[0].job is not None
    assert pool.slots[0].job.jobs[0].deaths, "the task that was in flight, run again"
    req = submit(pool, "plain", 2)
    assert not req.accepted and len(pool.scheduler) == 1, "waits for fake:0: fake:1 takes no more work"


def test_a_poison_task_that_breaks_every_process_it_runs_in_counts_once(pool: GPUPool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool.supervisor, "spawn", lambda slot: None)  # no processes here: the test revives it
    pool.slots[0].state = "busy"
    submit(pool, "plain", 1)  # runs on fake:1
    for _ in range(3):  # its process poisoned, the task run again there, and again
        poison(pool, 1)
        pool.supervisor.on_exit(pool.slots[1])
        pool.slots[1].state, pool.slots[1].chan = "idle", Chan()  # type: ignore[assignment]
        pool._dispatch()
    assert not pool.scheduler.quarantined, "the same task each time: the task's fault, not the device's"
    assert pool.status()["devices"][1]["counters"]["sticky_errors"] == 3
