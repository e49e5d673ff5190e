"""A guard around Celery's task-message strategy for GPU tasks.

Celery 5.7's worker decodes a task's body in ``Request.__init__``; a body that is valid JSON but not
``[args, kwargs, embed]`` raises there and stops the whole worker ("Unrecoverable error"). This strategy turns
such a message into Celery's ``InvalidTaskError`` path (logged and discarded) and stores a named failure,
:class:`MalformedTaskMessage`, so a client waiting on the result gets an answer instead of hanging.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default

from .errors import MalformedTaskMessage

__all__ = ["guarded"]

logger = logging.getLogger("celery_gpu.strategy")


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, with malformed messages failed by name instead of stopping the worker."""
    handler = default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
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
