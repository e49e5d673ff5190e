"""The pool driven directly around its scheduler: fake pipes, fake loop, no processes.

What is checked: revoked items are never sent; a ``batch_done`` frame ends each item through its own
callbacks; memory is reserved per batch and returned; a malformed outcome list fails every item by name. (The
flush policy itself is tested against the scheduler alone, in ``test_scheduler.py``.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.worker.pool import GPUPool
from celery_gpu.worker.work import Batch

GiB = 1024**3


class FakeLoop:
    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def call_later(self, seconds: float, fn: Callable[..., Any], *args: Any) -> None:
        self.later.append((seconds, fn, args))

    def remove_reader(self, fd: int) -> None:
        pass


class FakeChan:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.inbox: list[dict[str, Any]] = []

    def write(self, obj: dict[str, Any]) -> None:
        self.sent.append(obj)

    def read(self) -> dict[str, Any]:
        return self.inbox.pop(0)

    def fileno(self) -> int:
        return -1

    def trim(self) -> None:
        """The pool gives back a huge body's shared memory when its process answers (nothing to give here)."""


class FakeRequest:
    """What the pool sees of Celery's request: its bound callbacks (``accept_callback.__self__``)."""

    def __init__(self, revoked: bool = False) -> None:
        self._revoked = revoked
        self.accepted: list[int] = []
        self.outcome: Any = None

    def revoked(self) -> bool:
        return self._revoked

    def on_accepted(self, pid: int, t: float) -> None:
        self.accepted.append(pid)

    def on_success(self, result: Any) -> None:
        self.outcome = ("success", result)

    def on_failure(self, einfo: Any) -> None:
        self.outcome = ("failure", einfo.exception)


@pytest.fixture
def pool(make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch) -> GPUPool:
    monkeypatch.setenv("CELERY_GPU_DEVICES", "fake:1x8GiB")
    monkeypatch.setenv("CELERY_GPU_PER_DEVICE", "2")
    app = make_app()
    gpu = GPU(app)

    @gpu.task(name="double", batch=4, max_wait_ms=50, memory="1GiB", shared=False)
    def double(items: list[int]) -> list[int]:
        return [2 * x for x in items]

    @gpu.task(name="square", batch=4, max_wait_ms=50, shared=False)
    def square(items: list[int]) -> list[int]:
        return [x * x for x in items]

    @gpu.task(name="plain", shared=False)
    def plain(x: int) -> int:
        return x

    app.finalize()
    p = GPUPool(app=app, threads=False)
    p._loop = FakeLoop()  # type: ignore[assignment]
    for i, slot in enumerate(p.slots):
        slot.state, slot.chan, slot.pid = "idle", FakeChan(), 1000 + i  # type: ignore[assignment]
    return p


def submit(pool: GPUPool, name: str, x: int, revoked: bool = False) -> FakeRequest:
    req = FakeRequest(revoked)
    pool.apply_async(None, args=(name, uuid.uuid4().hex, {"id": "x"}, b"[]", "application/json", "utf-8"),
                     accept_callback=req.on_accepted, callback=req.on_success, error_callback=req.on_failure)
    return req


def frames(pool: GPUPool) -> list[dict[str, Any]]:
    return [f for s in pool.slots for f in s.chan.sent]  # type: ignore[union-attr]


def test_revoked_items_are_never_sent(pool: GPUPool) -> None:
    for slot in pool.slots:
        slot.state = "busy"
    keep = submit(pool, "double", 1)
    gone = submit(pool, "double", 2, revoked=True)
    for slot in pool.slots:
        slot.state = "idle"
    pool._dispatch()
    sent = frames(pool)
    assert len(sent) == 1 and len(sent[0]["items"]) == 1
    assert keep.accepted and not gone.accepted


def test_batch_done_ends_each_item_through_its_own_callbacks(pool: GPUPool) -> None:
    for slot in pool.slots:
        slot.state = "busy"
    reqs = [submit(pool, "double", x) for x in range(3)]
    pool.slots[0].state = "idle"
    pool.slots[1].state = "idle"  # nothing busy: the partial batch leaves at once
    pool._dispatch()
    slot = next(s for s in pool.slots if s.job is not None)
    work = slot.job
    assert isinstance(work, Batch) and len(work.jobs) == 3
    assert pool.scheduler.reserved[slot.device.label] == GiB  # one call's declaration, not one per item
    failure = {"kind": "error", "type": "ValueError", "module": "builtins", "message": "odd", "traceback": "tb"}
    slot.chan.inbox.append({"t": "batch_done", "job": work.seq, "calls": 1, "items": [  # type: ignore[union-attr]
        {"failed": False, "retval": "0", "runtime": 0.1},
        {"failed": True, "exc": failure, "runtime": 0.1},
        {"failed": False, "retval": "4", "runtime": 0.1},
    ]})
    pool.supervisor.on_readable(slot, slot.chan)  # type: ignore[arg-type]
    assert reqs[0].outcome == ("success", (0, "0", 0.1))
    assert reqs[1].outcome[0] == "success" and reqs[1].outcome[1][0] == 1  # failed=1, einfo for Celery
    assert type(reqs[1].outcome[1][1].exception).__name__ == "ValueError"
    assert reqs[2].outcome == ("success", (0, "4", 0.1))
    assert pool.scheduler.reserved[slot.device.label] == 0
    stats = pool._get_info()["batching"]["double"]
    assert stats["batches"] == 1 and stats["items"] == 3 and stats["calls"] == 1


def test_a_malformed_outcome_list_fails_every_item_by_name(pool: GPUPool) -> None:
    req = submit(pool, "double", 1)
    slot = next(s for s in pool.slots if s.job is not None)
    assert slot.job is not None
    slot.chan.inbox.append({"t": "batch_done", "job": slot.job.seq, "items": []})  # type: ignore[union-attr]
    pool.supervisor.on_readable(slot, slot.chan)  # type: ignore[arg-type]
    assert req.outcome[1][0] == 1
    assert type(req.outcome[1][1].exception).__name__ == "FrameError"
