"""celery-gpu worker of ``benchmarks/scheduling.py``: one batched task whose call takes GPU-like time.

Run as ``celery -A benchmarks._scheduling_app worker`` with ``CELERY_GPU_DEVICES=fake:1`` and
``CELERY_GPU_PER_DEVICE=2``. A call of ``work`` sleeps ``CALL_BASE_S + CALL_ITEM_S`` per item (a GPU kernel's
time barely grows with the batch), then returns each item; it appends the items it was given to
``SCHED_CALL_LOG`` (one line per call), so the benchmark counts every item that reached the device.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery

from celery_gpu import GPU

QUEUE = "scheduling-celery-gpu"
BATCH = 8
CALL_BASE_S = 0.020
CALL_ITEM_S = 0.0001

app = Celery("scheduling_bench", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"))
app.conf.update(
    task_default_queue=QUEUE,
    task_queue_max_priority=10,  # RabbitMQ would declare the queue with x-max-priority
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
gpu = GPU(app)


@gpu.task(batch=BATCH, max_wait_ms=5)
def work(items: list[int]) -> list[int]:
    """Each item back, after ``CALL_BASE_S + CALL_ITEM_S * len(items)`` seconds."""
    path = os.environ.get("SCHED_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"t": time.time(), "items": items}) + "\n")
    time.sleep(CALL_BASE_S + CALL_ITEM_S * len(items))
    return items


@gpu.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the device process that ran it (readiness)."""
    time.sleep(delay)
    return os.getpid()
