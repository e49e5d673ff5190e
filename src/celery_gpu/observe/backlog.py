"""The broker backlog of a worker's queues: messages waiting in the broker, sampled on a thread of its own.

An autoscaling signal (docs/operations.md, "Autoscaling"): how much work waits *before* any worker took it.
Every ``interval`` seconds a daemon thread asks the broker, on a connection of its own (never the worker's), for
the message count of each queue the worker consumes, with a passive ``queue_declare`` — one kombu call that
both brokers answer: RabbitMQ with the queue's ready messages, kombu's Redis transport with the length of the
queue's lists (every priority step summed). A queue Redis does not hold yet (never used, or emptied and
deleted) has no messages. The worker's loop never waits on it; a broker that cannot be reached leaves the
count unknown (``None``) until it can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BacklogSampler", "consumed_queues"]

logger = logging.getLogger("celery_gpu.metrics")


def consumed_queues(app: Any) -> list[str]:
    """The queues this worker consumes (``-Q``, or every queue the app declares), by name."""
    queues = getattr(app.amqp, "queues", None)
    selected = getattr(queues, "consume_from", None) or queues or {}
    return sorted(str(name) for name in selected)


class BacklogSampler:
    """Samples the broker's message count of each of ``queues()`` every ``interval`` seconds on a daemon thread.

    ``counts`` maps a queue to its last count (``None``: unknown); readers on other threads take a copy with
    :meth:`snapshot`.
    """

    def __init__(self, app: Any, queues: Callable[[], list[str]], interval: float) -> None:
        self.app = app
        self.queues = queues
        self.interval = interval
        self.counts: dict[str, int | None] = {}
        self.sampled_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery-gpu-backlog", daemon=True)
        self._conn: Any = None

    def start(self) -> BacklogSampler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, int | None]:
        """The last counts (a copy)."""
        return dict(self.counts)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)
        finally:
            self._close()

    def sample(self) -> None:
        """Count every queue once (on this thread)."""
        counts: dict[str, int | None] = {}
        try:
            if self._conn is None:
                self._conn = self.app.connection_for_read()
            channel = self._conn.channel()
            for name in self.queues():
                counts[name], channel = self._count(channel, name)
            channel.close()
        except Exception as exc:  # the broker is away: unknown until it answers again
            logger.debug("celery-gpu: broker backlog not sampled: %r", exc)
            counts = dict.fromkeys(self.queues())
            self._close()
        self.counts, self.sampled_at = counts, time.time()

    def _count(self, channel: Any, name: str) -> tuple[int | None, Any]:
        from kombu.exceptions import ChannelError

        try:
            return int(channel.queue_declare(queue=name, passive=True).message_count), channel
        except (ChannelError, *self._conn.channel_errors):  # no such queue: Redis (no list holds a message) or
            # RabbitMQ (404, which also closes the channel)
            try:
                channel.close()
            except Exception:
                pass
            return 0, self._conn.channel()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass
