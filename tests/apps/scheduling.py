"""Deadlines and priorities on a real worker: every call of a batch function is logged (``TEST_CALL_LOG``, one
JSON line with the task ids of its items), so tests see which items reached the device, and in what order."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_gpu import GPU
from tests.brokers import redis_url

app = Celery("scheduling")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    task_queue_max_priority=10,  # RabbitMQ: the worker's queue is declared with x-max-priority
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
gpu = GPU(app)


def _log(task: str, ids: list[str], **extra: Any) -> None:
    path = os.environ.get("TEST_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"task": task, "ids": ids, "t": time.time(), **extra}) + "\n")


@gpu.task(batch=4, max_wait_ms=5000, bind=True)
def mark(self: Any, items: list[Any], pause: float = 0.2) -> list[Any]:
    """Each item back after ``pause`` seconds per call; holds a partial batch up to 5 s while busy."""
    _log("mark", [r["id"] for r in self.request.batch])
    time.sleep(pause)
    return items


@gpu.task(batch=4, deadline_ms=300, bind=True)
def tight(self: Any, items: list[Any]) -> list[Any]:
    """Its calls must start within 300 ms of their arrival in the pool (``deadline_ms``)."""
    _log("tight", [r["id"] for r in self.request.batch])
    return items


@gpu.task
def nap(seconds: float) -> float:
    """Keeps one device process busy for ``seconds``."""
    time.sleep(seconds)
    return seconds
