"""Plain-Celery path of ``benchmarks/overhead.py``: prefork pool, spawned children, MLP built per child.

Run by the benchmark as ``celery -A benchmarks._overhead_plain_app worker --pool prefork --concurrency 2``;
the broker and result backend URL come from ``OVERHEAD_BROKER`` (and the serializer from ``BENCH_SERIALIZER``,
``json`` by default, for ``benchmarks/batching.py --serializer``). The model is built in a
``worker_process_init`` handler, the usual way to load a model once per prefork child.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

from benchmarks._batching_model import serializer_conf
from benchmarks._overhead_model import build_model, infer

QUEUE = "overhead-plain-celery"

# include=[__name__]: a spawned child imports this module again, so the signal handler below is connected there.
app = Celery(
    "overhead_plain", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"),
    include=[__name__],
)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,  # a shared Redis keeps the benchmark's results for 10 minutes only
    worker_pool_start_method="spawn",
    worker_proc_alive_timeout=120.0,  # importing torch and building the model can take seconds per child
    **serializer_conf(),
)

_model: Any = None


@signals.worker_process_init.connect
def load(**_: Any) -> None:
    global _model
    _model = build_model()  # also torch.set_num_threads(1) in this child


@app.task
def mlp(x: list[float]) -> float:
    """One MLP inference on a 1x512 input; the output's sum."""
    return infer(_model, x)


@app.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the pool child that ran it (readiness and leak checks)."""
    time.sleep(delay)
    return os.getpid()
