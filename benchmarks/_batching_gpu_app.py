"""celery-gpu worker of ``benchmarks/batching.py``: one app, a batched and an unbatched task on the same model.

Run by the benchmark as ``celery -A benchmarks._batching_gpu_app worker`` with ``CELERY_GPU_DEVICES=cpu`` and
``CELERY_GPU_PER_DEVICE=1`` (``--per-device``). The broker and result backend URL come from ``OVERHEAD_BROKER``,
the serializer from ``BENCH_SERIALIZER`` (``json`` by default). One worker serves the three celery-gpu paths,
measured one after the other.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, infer_batch, serializer_conf
from benchmarks._overhead_model import build_model, infer
from celery_gpu import GPU

QUEUE = "batching-celery-gpu"

app = Celery("batching_gpu", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"))
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,  # a shared Redis keeps the benchmark's results for 10 minutes only
    **serializer_conf(),
)
gpu = GPU(app)


@gpu.setup
def load(device: Any) -> None:
    device.state["model"] = build_model()  # also torch.set_num_threads(1) in this device process


@gpu.task(batch=BATCH_SIZE, max_wait_ms=MAX_WAIT_MS)
def mlp_batch(xs: list[list[float]]) -> list[float]:
    """Many 1x512 inputs, one per Celery task, through the MLP in one call; each output's sum."""
    return infer_batch(gpu.device.state["model"], xs)


@gpu.task
def mlp(x: list[float]) -> float:
    """One MLP inference on a 1x512 input; the output's sum (the unbatched path)."""
    return infer(gpu.device.state["model"], x)


@gpu.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the device process that ran it (readiness and leak checks)."""
    time.sleep(delay)
    return os.getpid()
