"""Acks in bulk: one flush per loop turn, one pipeline on a real kombu Redis channel."""

from __future__ import annotations

import uuid
from typing import Any

from celery_gpu.worker.consumer.acks import AckBuffer

# -- acks in bulk --------------------------------------------------------------------------------------------


class FakeMessage:
    def __init__(self) -> None:
        self.acknowledged = False
        self.channel = object()
        self.acks = 0

    def ack_log_error(self, log: Any, errors: Any) -> None:
        self.acks += 1
        self.acknowledged = True


def test_acks_of_one_turn_are_flushed_once() -> None:
    scheduled: list[Any] = []
    buf = AckBuffer(scheduled.append)
    messages = [FakeMessage() for _ in range(4)]
    for m in messages:
        buf.ack(m)()
    assert len(scheduled) == 1 and not any(m.acks for m in messages), "nothing acked before the flush"
    scheduled.pop()()
    assert [m.acks for m in messages] == [1, 1, 1, 1] and buf.flushes == 1 and buf.acked == 4
    buf.ack(messages[0])()
    scheduled.pop()()
    assert messages[0].acks == 1, "an acknowledged message is not acked twice"


def test_acks_on_redis_leave_the_unacked_index_in_one_pipeline(embedded_url: str) -> None:
    from kombu import Connection

    queue = f"acks-{uuid.uuid4().hex[:8]}"
    with Connection(embedded_url) as conn:
        simple = conn.SimpleQueue(queue)
        for i in range(6):
            simple.put({"i": i})
        messages = [simple.get(timeout=5) for _ in range(6)]
        channel = messages[0].channel
        client = channel.client
        assert client.hlen(channel.unacked_key) >= 6
        scheduled: list[Any] = []
        buf = AckBuffer(scheduled.append)
        for m in messages:
            buf.ack(m)()
        scheduled.pop()()
        tags = [m.delivery_tag for m in messages]
        assert not any(client.hexists(channel.unacked_key, t) for t in tags)
        assert not any(client.zscore(channel.unacked_index_key, t) is not None for t in tags)  # both of kombu's writes
        assert all(m.acknowledged for m in messages) and buf.acked == 6
        qos = channel.qos  # kombu forgets acked tags lazily: acked means marked dirty, or gone
        assert all(t in qos._dirty or t not in qos._delivered for t in tags)
        simple.close()
