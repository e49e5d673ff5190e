"""celery-batches worker of ``benchmarks/peers.py``: the anchor MLP behind a ``celery_batches.Batches`` task.

celery-batches needs Celery < 5.7, so this module runs in a virtualenv of its own that ``benchmarks/peers.py``
creates (Celery 5.6, celery-batches, redis, the same torch as celery-gpu's); it never imports celery_gpu. The
benchmark starts it as ``celery -A benchmarks._peers_batches_app worker --pool prefork --concurrency 2``. The
broker and result backend URL come from ``OVERHEAD_BROKER``, the serializer from ``BENCH_SERIALIZER`` (``json``
by default), the prefetch multiplier from ``PEERS_BATCHES_PREFETCH``.

The batch task follows celery-batches' documentation: its body gets the buffered requests (``SimpleRequest``),
runs them as one model call, and stores each request's result itself with ``app.backend.mark_as_done``. The
buffer is flushed when it holds ``flush_every`` (64) requests, and by a timer every ``flush_interval`` (5 ms)
while it is not empty: the batch size and wait of celery-gpu's batched task.

The client (``benchmarks/peers.py``, Celery 5.7) sends to the task names below with stand-ins of the tasks:
keep ``QUEUE``, ``MLP_TASK``, ``WHOAMI_TASK`` and ``STATS_KEY`` equal to ``BATCHES_QUEUE`` / ``BATCHES_MLP`` /
``BATCHES_WHOAMI`` / ``BATCHES_STATS_KEY`` there.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery, signals
from celery_batches import Batches

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, infer_batch, serializer_conf
from benchmarks._overhead_model import build_model

QUEUE = "peers-celery-batches"
MLP_TASK = "peers_batches.mlp"
WHOAMI_TASK = "peers_batches.whoami"
#: Redis hash (in the result backend's database) counting the batches and the items they held.
STATS_KEY = "peers-celery-batches-stats"

app = Celery(
    "peers_batches", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"),
    include=[__name__],
)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,  # a shared Redis keeps the benchmark's results for 10 minutes only
    # celery-batches can only batch what the worker has prefetched: Celery's default (4 per process) would cap
    # every batch at 8. The benchmark sets 128 (2 processes x 128 = two full batches per process, as
    # celery-gpu prefetches), or 0 (no limit).
    worker_prefetch_multiplier=int(os.environ.get("PEERS_BATCHES_PREFETCH", "128")),
    worker_proc_alive_timeout=120.0,  # importing torch and building the model can take seconds per child
    **serializer_conf(),
)

_model: Any = None
_model_lock = threading.Lock()


def model() -> Any:
    """The MLP of this process, built on first use (prefork children build it in ``worker_process_init``)."""
    global _model
    with _model_lock:
        if _model is None:
            _model = build_model()  # also torch.set_num_threads(1) in this process
        return _model


@signals.worker_process_init.connect
def load(**_: Any) -> None:
    model()


@app.task(base=Batches, name=MLP_TASK, flush_every=BATCH_SIZE, flush_interval=MAX_WAIT_MS / 1000)
def mlp(requests: list[Any]) -> None:
    """The buffered requests (one 1x512 input each) through the MLP in one call; each output's sum stored as
    that request's result."""
    sums = infer_batch(model(), [request.args[0] for request in requests])
    for request, value in zip(requests, sums, strict=True):
        app.backend.mark_as_done(request.id, value, request=request)
    # The benchmark's batch counters: one extra Redis round trip per batch (not per item).
    with app.backend.client.pipeline() as pipe:
        pipe.hincrby(STATS_KEY, "batches", 1).hincrby(STATS_KEY, "items", len(requests)).expire(STATS_KEY, 600)
        pipe.execute()


@app.task(name=WHOAMI_TASK)
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the process that ran it, once its model is built (readiness)."""
    model()
    time.sleep(delay)
    return os.getpid()
