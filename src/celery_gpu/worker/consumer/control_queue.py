"""The worker's remote-control queue, waited for when RabbitMQ still holds the one of a lost connection.

Celery declares each worker's remote-control queue (``<nodename>.celery.pidbox``) *exclusive*
(``control_queue_exclusive``, True by default since Celery 5.5): it belongs to the connection that declared it
and RabbitMQ deletes it when that connection closes — a moment *after* it closes, asynchronously. A worker
whose connections were dropped (``rabbitmqctl close_all_connections``, a broker restart, a network cut) and that
reconnects within that moment declares the queue again and gets ``405 RESOURCE_LOCKED``: a channel error, which
Celery's consumer does not retry (unless ``broker_channel_error_retry``), so the whole worker stopped
("Unrecoverable error"; 1 reconnect in 5, 8 ms after the drop, in issue 17's harness).

:class:`WaitForControlQueue` makes the remote-control bootstep try again, on a fresh channel, backing off for
up to :data:`WAIT` seconds, which covers the deletion of the old connection's queue. A queue still locked after
that is held by a live connection — another worker with the same node name — and Celery's own error (and its
"pidbox in use" meaning) stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from kombu.exceptions import InconsistencyError

__all__ = ["WAIT", "WaitForControlQueue", "locked"]

logger = logging.getLogger("celery_gpu.control")

#: Seconds the worker keeps trying to declare a locked remote-control queue before Celery's error stands.
WAIT = 10.0
_FIRST_DELAY = 0.05
_RESOURCE_LOCKED = 405  # AMQP reply code


def locked(exc: BaseException) -> bool:
    """Whether ``exc`` says an exclusive queue belongs to another connection (``405 RESOURCE_LOCKED``, raised
    by py-amqp as ``ResourceLocked``, by kombu's mailbox as ``InconsistencyError``)."""
    return isinstance(exc, InconsistencyError) or getattr(exc, "code", None) == _RESOURCE_LOCKED


def waiting(start: Callable[[Any], Any], box: Any, wait: float = WAIT,
            sleep: Callable[[float], None] = time.sleep) -> Callable[[Any], Any]:
    """``start`` (Celery's ``Pidbox.start``) trying again while the queue is locked, for up to ``wait`` s."""

    def start_when_free(c: Any) -> Any:
        deadline = time.monotonic() + wait
        delay = _FIRST_DELAY
        while True:
            try:
                return start(c)
            except Exception as exc:
                if not locked(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("celery-gpu: the remote-control queue is still held by a connection the broker "
                               "is closing (%s); trying again in %.2fs", exc, delay)
                _close_channel(box)  # the broker closed it with the error: the next try opens a fresh one
                sleep(delay)
                delay = min(delay * 2, 1.0)

    start_when_free.celery_gpu_waits = True  # type: ignore[attr-defined]
    return start_when_free


def _close_channel(box: Any) -> None:
    channel = getattr(getattr(box, "node", None), "channel", None)
    if channel is not None:
        try:
            channel.close()
        except Exception:  # already closed by the broker
            pass


class WaitForControlQueue(bootsteps.Step):  # type: ignore[misc]
    """Wraps the remote-control bootstep's start (and its box's, which a failed command's reset calls again)
    with :func:`waiting`."""

    requires = ("celery.worker.consumer.control:Control",)
    label = "celery-gpu control-queue wait"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        control = c.blueprint.steps.get("celery.worker.consumer.control.Control")
        box = getattr(control, "box", None)
        if box is None or getattr(box.start, "celery_gpu_waits", False):
            return
        box.start = waiting(box.start, box)
        control.start = box.start
