"""Deadlines in the pool, driven directly (fake pipes, fake loop): an item whose ``expires`` passes while it waits
is ended through Celery's own expiry check at its deadline (a timer), and is never sent to a device process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.worker.pool import GPUPool
from tests.unit.worker.test_pool import FakeChan, FakeLoop, FakeRequest, frames


class ExpiringRequest(FakeRequest):
    """Celery's request as far as expiry goes: ``expires`` (aware) and ``revoked()`` comparing it with now."""

    def __init__(self, expires: datetime | None) -> None:
        super().__init__()
        self.expires = expires
        self.announced: list[str] = []

    def revoked(self) -> bool:
        if self.expires is not None and datetime.now(timezone.utc) > self.expires:
            self.announced.append("expired")
            return True
        return False


@pytest.fixture
def pool(make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch) -> GPUPool:
    monkeypatch.setenv("CELERY_GPU_DEVICES", "fake:1")
    app = make_app()
    gpu = GPU(app)

    @gpu.task(name="double", batch=4, max_wait_ms=10_000, shared=False)
    def double(items: list[int]) -> list[int]:
        return items

    @gpu.task(name="quick", batch=4, deadline_ms=50, shared=False)
    def quick(items: list[int]) -> list[int]:
        return items

    app.finalize()
    p = GPUPool(app=app, threads=False)
    p._loop = FakeLoop()  # type: ignore[assignment]
    p.slots[0].state, p.slots[0].chan, p.slots[0].pid = "busy", FakeChan(), 1000  # type: ignore[assignment]
    return p


def submit(pool: GPUPool, name: str, expires_in: float | None) -> ExpiringRequest:
    expires = None if expires_in is None else datetime.now(timezone.utc) + timedelta(seconds=expires_in)
    req = ExpiringRequest(expires)
    request = {"id": "x", "expires": expires.isoformat() if expires else None}  # as Celery's request dict
    pool.apply_async(None, args=(name, uuid.uuid4().hex, request, b"[]", "application/json", "utf-8"),
                     accept_callback=req.on_accepted, callback=req.on_success, error_callback=req.on_failure)
    return req


def wake(pool: GPUPool) -> None:
    """Run what the pool asked its loop to run later (its timers), as if their time had come."""
    later, pool._loop.later = pool._loop.later, []  # type: ignore[union-attr]
    for _, fn, args in later:
        fn(*args)


def test_an_item_that_expires_while_waiting_is_revoked_at_its_deadline_and_never_sent(pool: GPUPool) -> None:
    keep = submit(pool, "double", None)
    gone = submit(pool, "double", 0.05)
    assert [round(s, 1) for s, _, _ in pool._loop.later] == [0.0]  # type: ignore[union-attr]
    time.sleep(0.06)
    wake(pool)
    assert gone.announced == ["expired"] and keep.announced == []
    assert pool.scheduler.waiting() == {"double": 1}
    assert pool.status()["expired"] == {"double": 1}
    pool.slots[0].state = "idle"
    pool._dispatch()
    sent = frames(pool)
    assert len(sent) == 1 and len(sent[0]["items"]) == 1 and keep.accepted and not gone.accepted


def test_deadline_ms_counts_from_arrival_when_the_message_has_no_expires(pool: GPUPool) -> None:
    req = submit(pool, "quick", None)
    (job,) = pool.scheduler.queues.queues["quick"].ordered()
    assert job.deadline is not None and job.deadline - job.arrived == pytest.approx(0.05)
    time.sleep(0.06)
    wake(pool)
    assert req.announced == ["expired"], "the pool set its expires so that Celery's own check ends it"
    assert req.expires is not None and req.expires < datetime.now(timezone.utc)
    assert len(pool.scheduler) == 0


def test_a_message_without_a_celery_request_fails_by_name(pool: GPUPool) -> None:
    errors: list[Any] = []
    pool.apply_async(None, args=("quick", uuid.uuid4().hex, {"id": "x"}, b"[]", "application/json", "utf-8"),
                     error_callback=errors.append)
    time.sleep(0.06)
    wake(pool)
    assert [type(e.exception).__name__ for e in errors] == ["TaskRevokedError"]
