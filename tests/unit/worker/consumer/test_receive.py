"""Bulk receive on a real kombu Redis channel (the embedded Redis): many messages per ``BRPOP`` reply, all in
the unacked index before delivery, the prefetch window kept, undelivered messages given back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_gpu.worker.consumer.receive import install, installed


@pytest.fixture()
def conn(embedded_url: str) -> Iterator[Connection]:
    with Connection(embedded_url) as c:
        yield c


def fill(conn: Connection, n: int) -> Queue:
    queue = Queue(f"bulk-{uuid.uuid4().hex[:8]}", Exchange("bulk", "direct"), routing_key=uuid.uuid4().hex)
    with conn.channel() as ch:
        producer = Producer(ch, exchange=queue.exchange, routing_key=queue.routing_key)
        queue(ch).declare()
        for i in range(n):
            producer.publish({"i": i})
    return queue


def consume(conn: Connection, queue: Queue, prefetch: int | None, bulk: int,
            on_message: Any = None) -> tuple[Any, list[Any]]:
    channel = conn.channel()
    got: list[Any] = []

    def callback(body: Any, message: Any) -> None:
        got.append(message)
        if on_message is not None:
            on_message(body, message)

    consumer = Consumer(channel, [queue], callbacks=[callback], auto_declare=True)
    if prefetch:
        consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    assert install(channel, bulk) == (bulk > 0)
    return channel, got


def unacked(channel: Any) -> int:
    return int(channel.client.hlen(channel.unacked_key))


def test_one_brpop_reply_brings_many_messages_in_order(conn: Connection) -> None:
    queue = fill(conn, 30)
    channel, got = consume(conn, queue, prefetch=None, bulk=256)
    assert installed(channel)
    before = unacked(channel)
    conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got] == list(range(30)), "one reply, every waiting message, in order"
    assert unacked(channel) - before == 30, "all of them in the unacked index"
    for m in got:
        m.ack()
    assert unacked(channel) == before


def test_the_prefetch_window_is_kept(conn: Connection) -> None:
    queue = fill(conn, 30)
    channel, got = consume(conn, queue, prefetch=8, bulk=256)
    conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got] == list(range(8))
    assert int(channel.client.llen(queue.name)) == 22, "the rest stay in the queue"
    with pytest.raises(TimeoutError):  # the window is full: nothing more until acks
        conn.drain_events(timeout=0.5)
    for m in got:
        m.ack()
    conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got] == list(range(16))


def test_bulk_zero_is_kombus_own_receive(conn: Connection) -> None:
    queue = fill(conn, 5)
    channel, got = consume(conn, queue, prefetch=None, bulk=0)
    assert not installed(channel)
    conn.drain_events(timeout=5)
    assert len(got) == 1


def test_a_failing_delivery_gives_the_rest_back_at_once(conn: Connection) -> None:
    queue = fill(conn, 6)

    def explode(body: Any, message: Any) -> None:
        if body["i"] == 2:
            raise RuntimeError("consumer failed")

    channel, got = consume(conn, queue, prefetch=None, bulk=256, on_message=explode)
    before = unacked(channel)
    with pytest.raises(RuntimeError):
        conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got] == [0, 1, 2]
    assert unacked(channel) - before == 3, "the three delivered stay unacked; the three others went back"
    assert int(channel.client.llen(queue.name)) == 3
    conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got[3:]] == [3, 4, 5], "and are received next, in order"
    for m in got:
        m.ack()


def test_other_transports_are_left_alone() -> None:
    with Connection("memory://") as c:
        assert not install(c.channel(), 256)


def test_the_unacked_entry_restores_the_message_as_sent(conn: Connection) -> None:
    import json

    queue = fill(conn, 3)
    channel, got = consume(conn, queue, prefetch=None, bulk=256)
    conn.drain_events(timeout=5)
    for m in got:
        message, exchange, routing_key = json.loads(channel.client.hget(channel.unacked_key, m.delivery_tag))
        assert message == m._raw
        assert (exchange, routing_key) == (m.delivery_info["exchange"], m.delivery_info["routing_key"])
    channel.qos.restore_unacked()
    assert int(channel.client.llen(queue.name)) == 3, "restored to the queue from the index"
