"""Batched tasks for the integration tests; every call of a batch function is logged (one JSON line)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from celery_gpu import GPU, RetryItem
from tests.brokers import redis_url

app = Celery("batched")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    task_acks_late=os.environ.get("TEST_ACKS_LATE", "1") == "1",
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)
gpu = GPU(app)


def _log(task: str, items: list[Any], **extra: Any) -> None:
    path = os.environ.get("TEST_BATCH_LOG")
    if path:
        line = json.dumps({"task": task, "pid": os.getpid(), "n": len(items), "items": items, "t": time.time(),
                           **extra})
        with open(path, "a") as f:
            f.write(line + "\n")


@gpu.task(batch=16, max_wait_ms=float(os.environ.get("TEST_MAX_WAIT_MS", "5")))
def double(items: list[int], pause: float = 0.0) -> list[int]:
    """Twice each item; ``pause`` seconds per call (to keep the device busy)."""
    _log("double", items, pause=pause)
    time.sleep(pause)
    return [2 * x for x in items]


@gpu.task(batch=16)
def square(items: list[int], pause: float = 0.0) -> list[int]:
    _log("square", items, pause=pause)
    time.sleep(pause)
    return [x * x for x in items]


@gpu.task(batch=8)
def picky(items: list[Any]) -> list[Any]:
    """Raises for the whole call when any item is ``"bad"`` (a batch the worker must bisect)."""
    _log("picky", items)
    if "bad" in items:
        raise ValueError("bad item in the batch")
    return [f"ok:{x}" for x in items]


@gpu.task(batch=8)
def short(items: list[int]) -> list[int]:
    """Returns one result too few."""
    _log("short", items)
    return items[:-1]


@gpu.task(batch=8)
def mixed(items: list[int]) -> list[Any]:
    """Per-item failures returned in place: odd items fail with ValueError."""
    _log("mixed", items)
    return [ValueError(f"odd {x}") if x % 2 else x for x in items]


@gpu.task(batch=8, bind=True, max_retries=3)
def retry_odd(self: Any, items: list[int]) -> list[Any]:
    """Odd items are retried until their third attempt (``RetryItem``), even ones succeed at once."""
    retries = [r.get("retries", 0) for r in self.request.batch]
    _log("retry_odd", items, retries=retries)
    return [RetryItem(countdown=0.1) if x % 2 and n < 2 else (x, n) for x, n in zip(items, retries, strict=True)]


@gpu.task(batch=8, autoretry_for=(KeyError,), retry_backoff=False, default_retry_delay=0.1, max_retries=2)
def auto(items: list[int]) -> list[Any]:
    """Item 13 always fails with KeyError: retried by autoretry_for, then failed."""
    _log("auto", items)
    return [KeyError(x) if x == 13 else x for x in items]


@gpu.task(batch=32)
def gpu_norms(items: list[list[float]]) -> list[dict[str, Any]]:
    """One torch call on this process's device for the whole batch: the L2 norm of each item."""
    import torch

    x = torch.tensor(items, device=gpu.device.torch)
    norms = torch.linalg.vector_norm(x, dim=1).tolist()
    return [{"norm": n, "device": str(x.device), "batch": len(items)} for n in norms]


@gpu.task
def nap(seconds: float) -> float:
    """An unbatched task that keeps its device process busy for ``seconds``."""
    time.sleep(seconds)
    return seconds


@gpu.task
def plain(x: int) -> int:
    """An unbatched GPU task sharing the worker."""
    return x + 1


# -- Celery-native behaviour (tests/integration/test_celery_native.py; the same bodies as tests/apps/prefork.py) --


@gpu.task
def boom(x: Any) -> None:
    raise ValueError(f"Unsupported input type: {type(x).__name__}")


@gpu.task(bind=True, max_retries=1, default_retry_delay=0)
def retry_reason(self: Any, x: Any) -> None:
    raise self.retry(exc=ValueError("retry me"), countdown=0)


@gpu.task(batch=8, bind=True, max_retries=3)
def retry_call(self: Any, items: list[int]) -> list[Any]:
    """``raise self.retry()`` for the whole call until every item of it has been retried twice; then each item
    with what its request says (attribute access, as on ``self.request``)."""
    retries = [req.retries for req in self.request.batch]
    _log("retry_call", items, retries=retries, ids=[req.id for req in self.request.batch])
    if min(retries) < 2:
        raise self.retry(countdown=0.2)
    return [{"x": x, "retries": req.retries, "id": req.id, "legacy": req["retries"]}
            for x, req in zip(items, self.request.batch, strict=True)]


@gpu.task(batch=8, bind=True, max_retries=1)
def retry_spent(self: Any, items: list[int]) -> list[Any]:
    """Always ``raise self.retry(exc=KeyError, countdown=1)``: each item is retried once (counted on its own
    request), then fails with the KeyError."""
    _log("retry_spent", items, retries=[req["retries"] for req in self.request.batch])  # the older dict style
    raise self.retry(exc=KeyError(f"again {items}"), countdown=1.0)


@gpu.task(batch=8)
def slow(items: list[int]) -> list[int]:
    """One call of a second for the whole batch."""
    _log("slow", items)
    time.sleep(1.0)
    return items
