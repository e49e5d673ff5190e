"""The chaos suite: failures injected into real workers (``tests.apps.chaos``), a ledger of every execution.

After the whole suite no shared-memory segment may be left in /dev/shm (the session-wide check of tests/
conftest.py already fails on any device process left running).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_gpu import GPU
from tests.brokers import Broker, make
from tests.worker import Worker

APP = "tests.apps.chaos"
DB = 5  # Redis databases 5 (broker) and 6 (results) belong to this suite


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def no_leftover_shared_memory() -> Iterator[None]:
    before = _shm()
    yield
    left = _shm() - before
    assert not left, f"shared-memory segments left in /dev/shm: {sorted(left)}"


@pytest.fixture(scope="session")
def redis_broker() -> Broker:
    return make("redis", None, db=DB)


@pytest.fixture(scope="session")
def rabbit_broker() -> Broker:
    return make("rabbitmq", None, db=DB)


def start(broker: Broker, tmp: Path, devices: str = "fake:2", per_device: int = 1, faults: str = "",
          env: dict[str, str] | None = None, queue: str | None = None) -> Worker:
    """A ready chaos worker with ``faults`` injected (``CELERY_GPU_FAULTS``) and its ledger in ``tmp``."""
    extra = {"TEST_LEDGER": str(tmp / f"ledger-{os.urandom(4).hex()}.jsonl"), "CELERY_GPU_FAULTS": faults,
             **(env or {})}
    w = Worker(broker, tmp, devices=devices, per_device=per_device, app_module=APP, extra_env=extra,
               queue=queue).start()
    try:
        w.wait_ready()
    except BaseException:
        w.stop()
        raise
    return w


def task(w: Worker, name: str, batch: int | None = None) -> Any:
    """Task ``name`` of the chaos app as a client sees it (``submit_many`` included)."""
    full = f"{APP}.{name}"
    if full in w.app.tasks:
        return w.app.tasks[full]
    gpu = GPU.of(w.app) or GPU(w.app)

    def stub(*_: Any, **__: Any) -> Any:
        raise AssertionError("runs only in the worker")

    return gpu.task(name=full, batch=batch)(stub) if batch else gpu.task(name=full)(stub)


def ledger(w: Worker) -> list[dict[str, Any]]:
    """Every execution of task code so far: ``{"ids", "pid", "call", "t"}``, in order."""
    path = Path(w.env["TEST_LEDGER"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def executions(w: Worker) -> dict[str, list[int]]:
    """Task id -> the pids of its executions, in order."""
    runs: dict[str, list[int]] = {}
    for entry in ledger(w):
        for task_id in entry["ids"]:
            runs.setdefault(task_id, []).append(entry["pid"])
    return runs
