"""Acknowledgements in bulk: the acks of one event-loop turn go to the broker together.

Celery acks each message on its own; on Redis that is one round trip (``ZREM`` + ``HDEL`` of the unacked
index) per task, the largest single cost in the worker's main process. GPU tasks' acks are collected and
flushed once per loop turn (``hub.call_soon``): on Redis in one pipeline for every message of a channel, on
other transports message by message as Celery does (AMQP acks are already one-way frames).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["AckBuffer", "keeps_unacked_index"]

logger = logging.getLogger("celery_gpu.acks")


def keeps_unacked_index(channel: Any) -> bool:
    """Whether ``channel`` is kombu's Redis channel with its unacked index (every one but ``ack_emulation=False``):
    the index that acks remove messages from and that bulk receive writes to."""
    try:
        from kombu.transport.redis import Channel
    except ImportError:  # pragma: no cover - redis is a core dependency
        return False
    return isinstance(channel, Channel) and hasattr(getattr(channel, "qos", None), "_remove_from_indices")


def _forget_acked(channel: Any) -> None:
    """Let a virtual transport's channel drop the messages it has just acked. kombu keeps each acked message
    (body and decoded payload) in its QoS until the *next* message arrives: on a worker that goes idle after a
    huge message, for good."""
    qos: Any = getattr(channel, "qos", None)
    if getattr(qos, "_dirty", None):
        qos._flush()


class AckBuffer:
    """Collects messages to ack; ``call_soon`` (the worker's hub) schedules one :meth:`flush` per turn."""

    def __init__(self, call_soon: Callable[[Callable[[], None]], Any]) -> None:
        self._call_soon = call_soon
        self._pending: list[tuple[Any, Any, Any]] = []  # (message, logger, connection errors)
        self._scheduled = False
        self.flushes = 0
        self.acked = 0

    def ack(self, message: Any) -> Callable[..., None]:
        """The ``ack(logger, errors)`` callable Celery's request calls for ``message``."""

        def deferred(log: Any = logger, errors: Any = (), *_: Any) -> None:
            self._pending.append((message, log, errors))
            if not self._scheduled:
                self._scheduled = True
                self._call_soon(self.flush)

        return deferred

    def flush(self) -> None:
        """Ack everything collected so far."""
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.flushes += 1
        by_channel: dict[int, list[tuple[Any, Any, Any]]] = {}
        for entry in pending:
            by_channel.setdefault(id(entry[0].channel), []).append(entry)
        for entries in by_channel.values():
            channel: Any = entries[0][0].channel
            if len(entries) > 1 and keeps_unacked_index(channel):
                self._flush_redis(channel, entries)
            else:
                for message, log, errors in entries:
                    self._ack_one(message, log, errors)
            _forget_acked(channel)

    def _ack_one(self, message: Any, log: Any, errors: Any) -> None:
        if message.acknowledged:
            return
        message.ack_log_error(log, errors)
        self.acked += 1

    def _flush_redis(self, channel: Any, entries: list[tuple[Any, Any, Any]]) -> None:
        from kombu.transport.virtual import QoS

        todo = [(m, log, errors) for m, log, errors in entries if not m.acknowledged]
        if not todo:
            return
        qos = channel.qos
        errors = todo[0][2]
        try:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                tags = [message.delivery_tag for message, _, _ in todo]
                index_key, unacked_key = getattr(qos, "unacked_index_key", None), getattr(qos, "unacked_key", None)
                if index_key and unacked_key:  # kombu's own two writes per ack, for every message at once
                    pipe.zrem(index_key, *tags).hdel(unacked_key, *tags)
                else:
                    for tag in tags:
                        qos._remove_from_indices(tag, pipe)
                pipe.execute()
        except Exception as exc:  # as Message.ack_log_error: a broken connection is logged, never raised here
            if errors and isinstance(exc, errors):
                todo[0][1].critical("Couldn't ack %d messages, reason:%r", len(todo), exc, exc_info=True)
                return
            raise
        for message, _, _ in todo:
            QoS.ack(qos, message.delivery_tag)  # type: ignore[no-untyped-call]  # the channel's own bookkeeping (prefetch window)
            message._state = "ACK"
        self.acked += len(todo)
