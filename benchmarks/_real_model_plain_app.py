"""Plain-Celery path of ``benchmarks/real_model.py``: prefork pool, spawned children, all-MiniLM-L6-v2 loaded once
per child in ``worker_process_init`` (the usual way to load a model in stock Celery), one sentence per task.

Run by the benchmark as ``celery -A benchmarks._real_model_plain_app worker --pool prefork --concurrency 2``; the
broker and result backend come from ``OVERHEAD_BROKER``, the model's device and dtype from ``REAL_MODEL_DEVICE``
(``cpu`` or ``cuda:0``) and ``EMBED_DTYPE``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, signals

from examples.embeddings.model import Embedder

QUEUE = "real-model-plain-celery"

# include=[__name__]: a spawned child imports this module again, so the signal handler below is connected there.
app = Celery("real_model_plain", broker=os.environ.get("OVERHEAD_BROKER"),
             backend=os.environ.get("OVERHEAD_BROKER"), include=[__name__])
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_pool_start_method="spawn",  # CUDA does not survive a fork
    worker_proc_alive_timeout=180.0,  # importing torch and transformers and loading the model take seconds
)

_embedder: Any = None


@signals.worker_process_init.connect
def load(**_: Any) -> None:
    global _embedder
    device = os.environ.get("REAL_MODEL_DEVICE", "cpu")
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # one thread per child, as every other path's model processes
    _embedder = Embedder(device, os.environ.get("EMBED_DTYPE", "float32"))
    _embedder(["warm-up"])


@app.task(name="real_model_plain.embed")
def embed(text: str) -> list[float]:
    """One sentence through the model: its embedding."""
    vector: list[float] = _embedder([text])[0].tolist()
    return vector


@app.task(name="real_model_plain.whoami")
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the pool child that ran it (readiness)."""
    time.sleep(delay)
    return os.getpid()
