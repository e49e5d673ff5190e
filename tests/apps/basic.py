"""A test app: tasks that report where they ran."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from celery_gpu import GPU

app = Celery("basic")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER", "redis://127.0.0.1:6379/14"),
    result_backend=os.environ.get("TEST_BACKEND", "redis://127.0.0.1:6379/15"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
gpu = GPU(app)

SETUP_LOG = os.environ.get("TEST_SETUP_LOG")


@gpu.setup
def load(device: Any) -> None:
    device.state["setup_pid"] = os.getpid()
    if SETUP_LOG:
        with open(SETUP_LOG, "a") as f:
            f.write(f"{os.getpid()} {device.label}\n")
    if os.environ.get("TEST_SETUP_FAIL") == device.label:
        raise RuntimeError(f"setup refused on {device.label}")


@gpu.task
def where(x: int) -> dict[str, Any]:
    d = gpu.device
    return {"x": x, "pid": os.getpid(), "device": d.label, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "setup_pid": d.state.get("setup_pid")}


@gpu.task(memory="1GiB")
def add(x: int, y: int) -> int:
    return x + y


@gpu.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@gpu.task(time_limit=1)
def hang() -> None:
    time.sleep(60)


@gpu.task
def boom(msg: str) -> None:
    raise ValueError(msg)


@app.task
def plain(x: int) -> int:
    return x * 2
