"""celery-gpu path of ``benchmarks/overhead.py``: the MLP built once per device process in ``@gpu.setup``.

Run by the benchmark as ``celery -A benchmarks._overhead_gpu_app worker`` with ``CELERY_GPU_DEVICES=cpu``
and ``CELERY_GPU_PER_DEVICE=2``; the broker and result backend URL come from ``OVERHEAD_BROKER``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from benchmarks._overhead_model import build_model, infer
from celery_gpu import GPU

QUEUE = "overhead-celery-gpu"

app = Celery("overhead_gpu", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"))
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=600,  # a shared Redis keeps the benchmark's results for 10 minutes only
)
gpu = GPU(app)


@gpu.setup
def load(device: Any) -> None:
    device.state["model"] = build_model()  # also torch.set_num_threads(1) in this device process


@gpu.task
def mlp(x: list[float]) -> float:
    """One MLP inference on a 1x512 input; the output's sum."""
    return infer(gpu.device.state["model"], x)


@gpu.task
def whoami(delay: float = 0.0) -> int:
    """After ``delay`` seconds, the pid of the device process that ran it (readiness and leak checks)."""
    time.sleep(delay)
    return os.getpid()
