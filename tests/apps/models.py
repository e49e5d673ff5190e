"""Models for the integration tests: declared sizes on fake devices, small torch models on the CPU device.

Every load is logged (``TEST_MODEL_LOG``, one JSON line: model, pid, device), so tests assert on the loads the
worker really made. Each ``use_<model>`` task returns its pid and the models its process holds after the call.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from celery_gpu import GPU, Device
from tests.brokers import redis_url

app = Celery("models")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
gpu = GPU(app)

GiB = 1024**3
#: Declared sizes on a 10 GiB fake device: an order where keeping N models (any N) goes wrong (tests).
FAKE_SIZES = {"a": 4 * GiB, "b": 4 * GiB, "c": 2 * GiB, "d": 4 * GiB, "e": 6 * GiB, "huge": 20 * GiB}
#: On the CPU device (its memory is the host's): 40 % of it each, so that a third model evicts one.
RAM = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
CPU_SIZES = {"lin_a": int(RAM * 0.4), "lin_b": int(RAM * 0.4), "lin_c": int(RAM * 0.4), "lin_measured": None}


def _log(name: str, device: Device) -> None:
    path = os.environ.get("TEST_MODEL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"model": name, "pid": os.getpid(), "device": device.label}) + "\n")


def _declare(name: str, size: int | None) -> None:
    def load(device: Device) -> Any:
        _log(name, device)
        if name.startswith("lin_"):
            import torch

            return torch.nn.Linear(256, 256).to(device.torch).eval()
        return {"name": name}

    gpu.model(name, memory=size)(load)

    def use(x: int) -> dict[str, Any]:
        model = gpu.models[name]
        if name.startswith("lin_"):
            import torch

            with torch.no_grad():
                x = int(model(torch.full((1, 256), float(x))).shape[1])
        return {"x": x, "pid": os.getpid(), "device": gpu.device.label, "loaded": gpu.models.loaded()}

    use.__name__ = use.__qualname__ = f"use_{name}"
    globals()[use.__name__] = gpu.task(name=f"{__name__}.use_{name}", model=name)(use)


for _name, _size in {**FAKE_SIZES, **CPU_SIZES}.items():
    _declare(_name, _size)


@gpu.task(model="undeclared")
def use_undeclared(x: int) -> int:
    return x
