"""celery-gpu worker of the end-to-end part of ``benchmarks/transfer.py``: a task that barely touches its array.

Run by the benchmark as ``celery -A benchmarks._transfer_app worker`` with ``CELERY_GPU_DEVICES=cpu`` and
``CELERY_GPU_PER_DEVICE=1``; the broker and result backend URL come from ``TRANSFER_BROKER``. The task reads a
strided sample of about 1024 elements, so the time of a round trip is the transfer (serialize, broker, hand-off
to the device process, decode) and not the work.

``accept_content`` includes ``pickle``: Celery's own pickle serializer is the benchmark's **baseline**, the thing
the arrays serializer is measured against. Only this benchmark app accepts it; never copy that setting into an
app that takes messages from anyone else (unpickling runs code). Results are small and always JSON.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from celery import Celery

from celery_gpu import GPU

QUEUE = "transfer-celery-gpu"
BROKER_ENV = "TRANSFER_BROKER"
SAMPLES = 1024  # elements the task reads, whatever the size of its array

app = Celery("transfer", broker=os.environ.get(BROKER_ENV), backend=os.environ.get(BROKER_ENV))
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,  # a shared Redis keeps the benchmark's results for 10 minutes only
    task_serializer="json",  # each call of the benchmark names its serializer
    result_serializer="json",
    accept_content=["json", "pickle", "celery-gpu-arrays"],  # pickle: the measured baseline, this app only
    result_accept_content=["json"],  # the client never unpickles anything
)
gpu = GPU(app)


def digest(a: Any) -> list[float]:
    """``[nbytes, check]`` of a float32 array (or the list of its values, on the JSON path): ``check`` is the sum
    of about ``SAMPLES`` evenly strided elements plus the last one, so a truncated or garbled transfer shows."""
    arr = a if isinstance(a, np.ndarray) else np.asarray(a, dtype="<f4")
    flat = arr.reshape(-1)
    if flat.size == 0:
        return [float(arr.nbytes), 0.0]
    return [float(arr.nbytes), float(flat[::max(1, flat.size // SAMPLES)].sum(dtype="f8") + float(flat[-1]))]


@gpu.task
def checksum(a: Any) -> list[float]:
    """The array's size in bytes and a cheap sampled sum (see :func:`digest`)."""
    return digest(a)


@gpu.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the device process that ran it (readiness and leak checks)."""
    time.sleep(delay)
    return os.getpid()
