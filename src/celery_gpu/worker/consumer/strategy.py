"""The task-message strategy of GPU tasks: Celery's default one, guarded, with acks in bulk.

Celery 5.7's worker decodes a task's body in ``Request.__init__``; a body that is valid JSON but not
``[args, kwargs, embed]`` raises there and stops the whole worker ("Unrecoverable error"). This strategy turns
such a message into Celery's ``InvalidTaskError`` path (logged and discarded) and stores a named failure,
:class:`MalformedTaskMessage`, so a client waiting on the result gets an answer instead of hanging.

With an event loop, acks go through an :class:`~celery_gpu.worker.consumer.acks.AckBuffer` shared by the consumer's GPU
tasks: one broker round trip per loop turn instead of one per task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

from ...errors import MalformedTaskMessage
from .acks import AckBuffer

__all__ = ["gpu_strategy"]

logger = logging.getLogger("celery_gpu.strategy")


def gpu_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, with malformed messages failed by name instead of stopping the worker."""
    handler = default(task, app, consumer, **kwargs)
    acks = _ack_buffer(consumer)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        # After a reconnect Celery chains prefetch restoration onto its own ack: keep it until restored.
        if acks is not None and getattr(consumer, "_maximum_prefetch_restored", True):
            ack = acks.ack(message)
        try:
            return handler(message, body, ack, reject, callbacks, **kw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            task_id = (getattr(message, "headers", None) or {}).get("id")
            error = MalformedTaskMessage(
                f"malformed message for task {task.name} (id {task_id}): {type(exc).__name__}: {exc}; "
                "a task body must be [args, kwargs, embed]"
            )
            if task_id:
                try:
                    task.backend.mark_as_failure(task_id, error)
                except Exception:  # the backend may be down; the message is still discarded, and logged
                    logger.exception("celery-gpu: could not store the failure of malformed task %s", task_id)
            raise InvalidTaskError(str(error)) from exc

    return task_message_handler


def _ack_buffer(consumer: Any) -> AckBuffer | None:
    hub = getattr(consumer, "hub", None)
    if hub is None:
        return None  # no event loop: Celery's own acks
    acks: AckBuffer | None = getattr(consumer, "_celery_gpu_acks", None)
    if acks is None:
        acks = AckBuffer(hub.call_soon)
        consumer._celery_gpu_acks = acks
    return acks
