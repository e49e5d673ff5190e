"""The remote-control queue is waited for while RabbitMQ still holds a lost connection's one (issue 17, item 6)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import amqp.exceptions
import pytest
from kombu.exceptions import InconsistencyError

from celery_gpu.worker.consumer.control_queue import locked, waiting


def _locked() -> Exception:
    return amqp.exceptions.ResourceLocked("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue")


def test_what_counts_as_locked() -> None:
    assert locked(_locked()) and locked(InconsistencyError("pidbox in use"))
    assert not locked(amqp.exceptions.NotFound("no queue")) and not locked(ValueError("x"))


def test_a_locked_queue_is_tried_again_on_a_fresh_channel_until_free() -> None:
    closed: list[int] = []
    box = SimpleNamespace(node=SimpleNamespace(channel=SimpleNamespace(close=lambda: closed.append(1))))
    tries: list[Any] = []

    def start(c: Any) -> str:
        tries.append(c)
        if len(tries) < 4:
            raise _locked()
        return "listening"

    slept: list[float] = []
    assert waiting(start, box, wait=10, sleep=slept.append)("consumer") == "listening"
    assert len(tries) == 4 and len(closed) == 3
    assert slept == [0.05, 0.1, 0.2], "backing off"


def test_other_errors_and_a_lock_that_stays_are_celerys_to_handle() -> None:
    box = SimpleNamespace(node=SimpleNamespace(channel=None))

    def fails(c: Any) -> None:
        raise amqp.exceptions.AccessRefused("no")

    with pytest.raises(amqp.exceptions.AccessRefused):
        waiting(fails, box, sleep=lambda s: None)("c")

    def stays_locked(c: Any) -> None:
        raise _locked()

    with pytest.raises(amqp.exceptions.ResourceLocked):  # another worker with this node name: Celery's error
        waiting(stays_locked, box, wait=0.3, sleep=lambda s: None)("c")
