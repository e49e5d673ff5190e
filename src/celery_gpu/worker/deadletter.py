"""The dead-letter queue: where a task goes that crashed its device process on every allowed attempt.

Set ``gpu_dead_letter_queue = "gpu.dead"`` (or ``CELERY_GPU_DEAD_LETTER_QUEUE``). The task's original message
(body, content type, Celery headers) is published there unchanged, plus ``x-celery-gpu-*`` headers saying
why, so it can be inspected, or run again by a worker consuming that queue once the cause is fixed. Its
result is marked failed with :class:`~celery_gpu.errors.TaskCrashedDevice` either way.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["publish"]

logger = logging.getLogger("celery_gpu.pool")

# Keys of a worker's request dict that are not message headers (properties, worker-side additions).
_NOT_HEADERS = {"reply_to", "correlation_id", "hostname", "delivery_info", "args", "kwargs", "is_eager",
                "properties", "body", "content_type", "content_encoding"}


def publish(app: Any, queue: str, task_id: str, request: dict[str, Any], body: Any, content_type: str,
            content_encoding: str, reason: str, attempts: int) -> bool:
    """Publish a task's message to ``queue`` (declared durable, as Celery declares a queue it creates).

    Returns False (and logs why) when the broker refuses it.
    """
    from kombu.entity import Exchange, Queue

    dlq = Queue(queue, Exchange(queue, "direct"), routing_key=queue, durable=True)  # type: ignore[no-untyped-call]
    headers = {k: v for k, v in request.items() if k not in _NOT_HEADERS}
    headers.update({"x-celery-gpu-dead-letter": reason, "x-celery-gpu-attempts": attempts})
    if isinstance(body, memoryview):
        body = body.tobytes()
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(
                body, exchange=queue, routing_key=queue, headers=headers, content_type=content_type,
                content_encoding=content_encoding, correlation_id=task_id, reply_to=request.get("reply_to"),
                declare=[dlq], retry=True, retry_policy={"max_retries": 3},
            )
    except Exception as exc:
        logger.error("celery-gpu: could not send %s to the dead-letter queue %s: %r", task_id, queue, exc)
        return False
    logger.warning("celery-gpu: %s sent to the dead-letter queue %s (%s)", task_id, queue, reason)
    return True
