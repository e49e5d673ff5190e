"""celery-gpu worker of ``benchmarks/cpu_threads.py``: the MLP of ``_overhead_model`` as a batched task on the CPU
device, with torch's threads left to the pool (no ``torch.set_num_threads`` here: the CPU device's thread budget
decides). Broker and backend from ``OVERHEAD_BROKER``; each worker of the benchmark consumes its own queue."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from benchmarks._overhead_model import MODEL_SEED, WIDTHS
from celery_gpu import GPU

app = Celery("threads_bench", broker=os.environ.get("OVERHEAD_BROKER"), backend=os.environ.get("OVERHEAD_BROKER"))
app.conf.update(task_default_queue=os.environ.get("BENCH_QUEUE", "threads-bench"),
                broker_connection_retry_on_startup=True, result_expires=600)
gpu = GPU(app)


@gpu.setup
def load(device: Any) -> None:
    import torch

    torch.manual_seed(MODEL_SEED)
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS, WIDTHS[1:], strict=False)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.ReLU())
    device.state["model"] = torch.nn.Sequential(*layers).eval()


@gpu.task(batch=64, max_wait_ms=5)
def mlp_batch(xs: list[list[float]]) -> list[float]:
    """Many 1x512 inputs through the MLP in one call; each output's sum."""
    import torch

    with torch.inference_mode():
        out = gpu.device.state["model"](torch.tensor(xs, dtype=torch.float32))
    return [float(v) for v in out.sum(dim=1)]


@gpu.task
def threads() -> dict[str, Any]:
    """torch's threads in the device process that runs it, and its pid."""
    import torch

    return {"torch": torch.get_num_threads(), "pid": os.getpid()}


@gpu.task
def whoami(delay: float = 0.0) -> int:
    time.sleep(delay)
    return os.getpid()
