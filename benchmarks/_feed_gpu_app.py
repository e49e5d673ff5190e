"""celery-gpu worker of ``benchmarks/feed.py``: the batched no-op and MLP tasks (``batch=64``, 5 ms wait).

Run as ``celery -A benchmarks._feed_gpu_app worker`` with ``CELERY_GPU_DEVICES`` (``cpu``, or ``0``) and
``CELERY_GPU_PER_DEVICE``; broker and result backend from ``FEED_BROKER`` / ``FEED_BACKEND``. The worker accepts
the arrays serializer and JSON; results are written with the arrays serializer.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from benchmarks._feed_model import (
    BACKEND_ENV,
    BATCH,
    BROKER_ENV,
    MAX_WAIT_MS,
    NOOP_ONLY_ENV,
    app_conf,
    load_mlp,
    mlp_batch,
    noop_batch,
)
from celery_gpu import GPU

QUEUE = "feed-celery-gpu"

app = Celery("feed_gpu", broker=os.environ.get(BROKER_ENV), backend=os.environ.get(BACKEND_ENV))
app.conf.update(task_default_queue=QUEUE, **app_conf())
gpu = GPU(app)


@gpu.setup
def load(device: Any) -> None:
    if os.environ.get(NOOP_ONLY_ENV) != "1":  # benchmarks/topology.py: the no-op only, on fake devices
        device.state["model"] = load_mlp(device.torch)


@gpu.task(batch=BATCH, max_wait_ms=MAX_WAIT_MS)
def noop(xs: list[Any]) -> list[Any]:
    """The no-op model: each item back as it came."""
    return noop_batch(xs)


@gpu.task(batch=BATCH, max_wait_ms=MAX_WAIT_MS)
def mlp(xs: list[Any]) -> list[float]:
    """The anchor MLP on many 1x512 items in one call; each output's sum."""
    return mlp_batch(gpu.device.state["model"], gpu.device.torch, xs)


@gpu.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the device process that ran it (readiness)."""
    time.sleep(delay)
    return os.getpid()
