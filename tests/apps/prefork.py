"""A plain Celery app (no celery-gpu) whose tasks have the bodies of ``tests.apps.batched``'s ``boom`` and
``retry_reason``: a stock prefork worker runs it, so a test can compare its events with the GPU pool's."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tests.brokers import redis_url

app = Celery("prefork")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)


@app.task(name="tests.apps.batched.boom")
def boom(x: Any) -> None:
    raise ValueError(f"Unsupported input type: {type(x).__name__}")


@app.task(name="tests.apps.batched.retry_reason", bind=True, max_retries=1, default_retry_delay=0)
def retry_reason(self: Any, x: Any) -> None:
    raise self.retry(exc=ValueError("retry me"), countdown=0)
