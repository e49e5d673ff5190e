"""GPUPool driven directly, as Celery's request drives it (apply_async + callbacks), without a consumer.

Checks what a worker-level test sees only indirectly: memory admission, the order of callbacks on a hard
time limit, terminate, and that tasks queued in the pool wait for a slot rather than fail.
"""

from __future__ import annotations

import ast
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billiard.exceptions import Terminated, TimeLimitExceeded
from kombu.serialization import dumps

from tests.worker import ROOT, wait_until

pytestmark = pytest.mark.broker


class Recorder:
    """The callbacks Celery's Request passes to apply_async, recording what the pool calls and when."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.events: list[tuple[str, Any, float]] = []
        self.done = threading.Event()

    def _add(self, kind: str, value: Any, final: bool = False) -> None:
        self.events.append((kind, value, time.monotonic()))
        if final:
            self.done.set()

    def accepted(self, pid: int, t: float) -> None:
        self._add("accepted", pid)

    def success(self, ret: Any) -> None:
        self._add("success", ret, final=True)

    def failure(self, einfo: Any) -> None:
        self._add("failure", einfo.exception, True)

    def timeout(self, soft: bool, seconds: float) -> None:
        self._add("timeout", (soft, seconds))

    def when(self, kind: str) -> float:
        return next(t for k, _, t in self.events if k == kind)


@pytest.fixture()
def make_pool(embedded_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("TEST_BROKER", embedded_url)
    monkeypatch.setenv("TEST_BACKEND", embedded_url)
    from celery_gpu.worker.pool import GPUPool
    from tests.apps.basic import app

    pools: list[Any] = []

    def make(devices: str, per_device: int = 1) -> Any:
        monkeypatch.setenv("CELERY_GPU_DEVICES", devices)
        monkeypatch.setenv("CELERY_GPU_PER_DEVICE", str(per_device))
        pool = GPUPool(app=app, threads=True)
        pool.start()
        pools.append(pool)
        assert wait_until(lambda: all(s.state == "idle" for s in pool.slots), 60)
        return pool

    yield make
    for pool in pools:
        pool.stop()
        assert all(s.proc is None for s in pool.slots)


def submit(pool: Any, name: str, *args: Any, timeout: float | None = None) -> Recorder:
    task_id = uuid.uuid4().hex
    content_type, encoding, body = dumps((list(args), {}, {}), "json")
    rec = Recorder(task_id)
    pool.apply_async(
        None, args=("tests.apps.basic." + name, task_id, {"id": task_id, "task": "tests.apps.basic." + name},
                    body, content_type, encoding),
        callback=rec.success, accept_callback=rec.accepted, error_callback=rec.failure,
        timeout_callback=rec.timeout, timeout=timeout,
    )
    return rec


def test_declared_memory_is_never_oversubscribed(make_pool: Any) -> None:
    pool = make_pool("fake:1x1GiB", per_device=2)  # two processes, room for one 1 GiB task at a time
    first, second = submit(pool, "hold", 0.5), submit(pool, "hold", 0.5)
    free = submit(pool, "where", 1)  # declares nothing: runs on the other process meanwhile
    for rec in (first, second, free):
        assert rec.done.wait(30), rec.events
    # The second 1 GiB task starts only once the first has finished (it holds the device for 0.5 s).
    assert second.when("accepted") - first.when("accepted") >= 0.45
    assert free.when("success") < first.when("success")


def test_queued_tasks_wait_for_a_slot(make_pool: Any) -> None:
    pool = make_pool("fake:1")
    recs = [submit(pool, "add", i, i) for i in range(50)]
    for rec in recs:
        assert rec.done.wait(30)
    assert [r.events[-1][0] for r in recs] == ["success"] * 50
    assert [r.events[-1][1][1] for r in recs] == [repr(2 * i) for i in range(50)]


def test_hard_limit_fails_then_times_out_then_respawns(make_pool: Any) -> None:
    pool = make_pool("fake:1")
    old = pool.slots[0].pid
    rec = submit(pool, "sleep", 30, timeout=0.5)
    assert rec.done.wait(10)
    kinds = [k for k, _, _ in rec.events]
    assert kinds == ["accepted", "failure", "timeout"], kinds  # as billiard's prefork does
    assert isinstance(rec.events[1][1], TimeLimitExceeded)
    assert rec.events[2][1] == (False, 0.5)
    assert wait_until(lambda: pool.slots[0].state == "idle" and pool.slots[0].pid != old, 30)
    assert submit(pool, "add", 1, 2).done.wait(30)


def test_terminate_ends_the_job_with_terminated(make_pool: Any) -> None:
    pool = make_pool("fake:1")
    task_id = uuid.uuid4().hex
    content_type, encoding, body = dumps(([30], {}, {}), "json")
    rec = Recorder(task_id)
    job = pool.apply_async(None, args=("tests.apps.basic.sleep", task_id, {"id": task_id}, body, content_type,
                                       encoding),
                           callback=rec.success, accept_callback=rec.accepted, error_callback=rec.failure)
    assert wait_until(lambda: bool(job.worker_pids()), 10)
    pid = job.worker_pids()[0]
    pool.terminate_job(pid, signal.SIGTERM)
    job.terminate(signal.SIGTERM)  # what Celery's Request.terminate does next
    assert rec.done.wait(10)
    assert isinstance(rec.events[-1][1], Terminated)
    assert wait_until(lambda: pool.slots[0].state == "idle" and pool.slots[0].pid != pid, 30)


def test_crash_while_idle_is_respawned(make_pool: Any) -> None:
    pool = make_pool("fake:2")
    victim = pool.slots[0].pid
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: pool.slots[0].pid != victim and pool.slots[0].state == "idle", 30)
    recs = [submit(pool, "where", i) for i in range(10)]
    assert all(r.done.wait(30) and r.events[-1][0] == "success" for r in recs)


def test_setup_state_stays_in_its_process(make_pool: Any, tmp_path: Path) -> None:
    pool = make_pool("fake:2", per_device=2)
    pids = {s.pid for s in pool.slots}
    assert len(pids) == 4
    info = pool.info
    assert info["max-concurrency"] == 4 and sorted(info["processes"]) == sorted(pids)
    assert [d["device"] for d in info["devices"]] == ["fake:0", "fake:1"]


def test_max_tasks_per_child_recycles_the_process(embedded_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("TEST_BROKER", embedded_url)
    monkeypatch.setenv("TEST_BACKEND", embedded_url)
    monkeypatch.setenv("CELERY_GPU_DEVICES", "fake:1")
    from celery_gpu.worker.pool import GPUPool
    from tests.apps.basic import app

    pool = GPUPool(app=app, threads=True, maxtasksperchild=3)  # what `celery worker --max-tasks-per-child 3` passes
    pool.start()
    try:
        pids = []
        for i in range(7):
            rec = submit(pool, "where", i)
            assert rec.done.wait(30) and rec.events[-1][0] == "success", rec.events
            pids.append(ast.literal_eval(rec.events[-1][1][1])["pid"])
        assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    finally:
        pool.stop()


def test_a_job_revoked_while_queued_is_never_sent(make_pool: Any) -> None:
    pool = make_pool("fake:1")

    class RevokedRequest:
        calls: list[str] = []

        def revoked(self) -> bool:  # Celery's Request.revoked(): marks, acks and announces
            return True

        def on_accepted(self, pid: int, t: float) -> None:
            self.calls.append("accepted")

    request = RevokedRequest()
    blocker = submit(pool, "sleep", 0.3)
    task_id = uuid.uuid4().hex
    content_type, encoding, body = dumps(([1], {}, {}), "json")
    ran: list[Any] = []
    pool.apply_async(None, args=("tests.apps.basic.where", task_id, {"id": task_id}, body, content_type, encoding),
                     callback=ran.append, accept_callback=request.on_accepted, error_callback=ran.append)
    assert blocker.done.wait(10)
    assert submit(pool, "add", 1, 1).done.wait(10)  # the slot went on to the next job
    assert ran == [] and request.calls == []


def test_an_undecodable_body_fails_by_name_and_the_result_is_stored(make_pool: Any, embedded_url: str) -> None:
    from celery import Celery

    pool = make_pool("fake:1")
    pid = pool.slots[0].pid
    task_id = uuid.uuid4().hex
    rec = Recorder(task_id)
    pool.apply_async(None, args=("tests.apps.basic.where", task_id, {"id": task_id}, b"\\xff not json",
                                 "application/json", "utf-8"),
                     callback=rec.success, accept_callback=rec.accepted, error_callback=rec.failure)
    assert rec.done.wait(10)
    failed, einfo, _ = rec.events[-1][1]
    assert failed == 1 and type(einfo.exception).__name__ == "MalformedTaskMessage"  # as prefork: not wrapped
    client = Celery("direct-client", broker=embedded_url, backend=embedded_url, set_as_current=False)
    stored = client.AsyncResult(task_id)
    assert stored.state == "FAILURE" and "cannot run task" in str(stored.result)
    assert pool.slots[0].pid == pid  # the process lives on
    assert submit(pool, "add", 2, 3).done.wait(10)
