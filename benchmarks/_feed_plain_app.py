"""Plain-Celery worker of ``benchmarks/feed.py``: stock prefork, spawned children, the MLP built per child in
``worker_process_init``; the no-op and MLP tasks of one item each.

Run as ``celery -A benchmarks._feed_plain_app worker --pool prefork --concurrency 2``; broker and backend from
``FEED_BROKER`` / ``FEED_BACKEND``, the children's torch device from ``FEED_DEVICE``. The arrays serializer is
registered (``celery_gpu.arrays``), so this worker reads the same messages as the celery-gpu worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

from benchmarks._feed_model import BACKEND_ENV, BROKER_ENV, app_conf, load_mlp, mlp_batch, torch_device
from celery_gpu import arrays

QUEUE = "feed-plain-celery"

arrays.register()
app = Celery("feed_plain", broker=os.environ.get(BROKER_ENV), backend=os.environ.get(BACKEND_ENV),
             include=[__name__])
app.conf.update(task_default_queue=QUEUE, worker_pool_start_method="spawn", worker_proc_alive_timeout=120.0,
                **app_conf())

_model: Any = None


@signals.worker_process_init.connect
def load(**_: Any) -> None:
    global _model
    _model = load_mlp(torch_device())


@app.task
def noop(x: Any) -> Any:
    """The no-op model: the item back as it came."""
    return x


@app.task
def mlp(x: Any) -> float:
    """The anchor MLP on one 1x512 item; the output's sum."""
    return mlp_batch(_model, torch_device(), [x])[0]


@app.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the child that ran it (readiness)."""
    time.sleep(delay)
    return os.getpid()
