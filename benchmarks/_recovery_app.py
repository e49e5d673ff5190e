"""App of ``benchmarks/recovery.py``: tiny tasks whose only job is to be failed on purpose.

The broker and result backend URL come from ``OVERHEAD_BROKER``; faults come from ``CELERY_GPU_FAULTS`` (set by
the benchmark per worker). Nothing here uses torch: the benchmark measures the pool's recoveries, not a model.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery

from celery_gpu import GPU

app = Celery("recovery", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"))
app.conf.update(
    task_default_queue=os.environ.get("RECOVERY_QUEUE", "recovery"),
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_acks_late=True,
)
gpu = GPU(app)


@gpu.task(batch=64)
def echo(items: list[Any]) -> list[Any]:
    """The items back; ``"poison"`` kills its process."""
    if "poison" in items:
        os.kill(os.getpid(), signal.SIGKILL)
    return items


@gpu.task
def nap(seconds: float) -> int:
    """Sleeps, then its pid."""
    time.sleep(seconds)
    return os.getpid()
