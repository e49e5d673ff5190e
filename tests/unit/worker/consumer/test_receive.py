"""Atomic bulk receive on a real kombu Redis channel (the embedded Redis): many messages per round trip, each
popped and written to the unacked index (with its owner) in one step, the prefetch window kept, undelivered
messages given back, a dead owner's messages put back in their queue."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_gpu.worker.consumer.inflight import LEASE_PREFIX, OWNERS, Lease, held, restore
from celery_gpu.worker.consumer.receive import atomic, install, installed


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
            on_message: Any = None, owner: str | None = None) -> tuple[Any, list[Any]]:
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
    assert install(channel, bulk, owner=owner)
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


def test_bulk_zero_receives_one_message_a_time_still_atomically(conn: Connection) -> None:
    queue = fill(conn, 5)
    channel, got = consume(conn, queue, prefetch=None, bulk=0)
    assert installed(channel) and atomic(channel)
    before = unacked(channel)
    conn.drain_events(timeout=5)
    assert len(got) == 1
    assert unacked(channel) - before == 1
    got[0].ack()


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


def owners(channel: Any) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in channel.client.hgetall(OWNERS).items()}


def test_each_message_is_recorded_with_its_owner_until_acked(conn: Connection) -> None:
    queue = fill(conn, 4)
    node = f"w-{uuid.uuid4().hex[:6]}@test"
    channel, got = consume(conn, queue, prefetch=None, bulk=256, owner=node)
    conn.drain_events(timeout=5)
    mine = {t for t, n in owners(channel).items() if n == node}
    assert mine == {m.delivery_tag for m in got}
    got[0].ack()
    got[1].reject(requeue=True)
    assert {t for t, n in owners(channel).items() if n == node} == {m.delivery_tag for m in got[2:]}
    for m in got[2:]:
        m.ack()
    assert node not in held(channel)


def test_a_move_whose_reply_is_never_read_leaves_the_message_in_the_index(conn: Connection) -> None:
    """The worker dies between the pop and the delivery: the message is in the unacked index with its owner,
    and goes back to its queue when the owner's lease is gone (here: put back by hand)."""
    queue = fill(conn, 1)
    node = f"dead-{uuid.uuid4().hex[:6]}@test"
    channel, got = consume(conn, queue, prefetch=None, bulk=0, owner=node)
    conn.transport.cycle.on_poll_start()  # the move is sent (kombu's poller: the BRPOP connection) ...
    channel.client.connection.disconnect()  # ... and the worker dies before it reads the reply
    assert not got
    assert wait_for(lambda: held(channel).get(node)), "the popped message is held by its (dead) owner"
    assert int(channel.client.llen(queue.name)) == 0
    assert restore(channel, node, held(channel)[node]) == 1
    assert int(channel.client.llen(queue.name)) == 1, "back in its queue"
    assert node not in held(channel)


def test_the_lease_puts_back_what_a_dead_worker_held_and_leaves_a_live_ones(conn: Connection) -> None:
    from celery import Celery

    queue = fill(conn, 2)
    dead, live = f"dead-{uuid.uuid4().hex[:6]}@t", f"live-{uuid.uuid4().hex[:6]}@t"
    app = Celery(broker=conn.as_uri(include_password=True), set_as_current=False)
    other = Lease(app, live, 5)  # the live worker's lease, taken (its thread renews it)
    other.start()
    try:
        channel, got = consume(conn, queue, prefetch=None, bulk=0, owner=dead)
        conn.drain_events(timeout=5)
        channel._celery_gpu_owner = live
        conn.drain_events(timeout=5)
        assert [held(channel).get(n) for n in (dead, live)] == [[got[0].delivery_tag], [got[1].delivery_tag]]
        me = Lease(app, f"me-{uuid.uuid4().hex[:6]}@t", 5)
        assert me.recover() == 1, "only the dead worker's message went back"
        assert int(channel.client.llen(queue.name)) == 1
        assert held(channel).get(live) == [got[1].delivery_tag]
        assert channel.client.exists(LEASE_PREFIX + live)
    finally:
        other.stop()
    assert not channel.client.exists(LEASE_PREFIX + live), "given up at stop"
    got[1].ack()


def test_a_message_on_another_priority_step_is_received(conn: Connection) -> None:
    queue = Queue(f"pri-{uuid.uuid4().hex[:8]}", Exchange("pri", "direct"), routing_key=uuid.uuid4().hex)
    with conn.channel() as ch:
        queue(ch).declare()
        Producer(ch, exchange=queue.exchange, routing_key=queue.routing_key).publish({"i": 1}, priority=5)
    channel, got = consume(conn, queue, prefetch=None, bulk=0)
    for _ in range(20):
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            continue
        break
    assert [m.payload["i"] for m in got] == [1]
    got[0].ack()


def test_garbage_in_the_queue_is_dropped_and_the_messages_around_it_delivered(conn: Connection) -> None:
    queue = fill(conn, 2)
    conn.default_channel.client.lpush(queue.name, b"\xff not json")  # between the two (RPOP takes the oldest)
    with conn.channel() as ch:
        Producer(ch, exchange=queue.exchange, routing_key=queue.routing_key).publish({"i": 2})
    channel, got = consume(conn, queue, prefetch=None, bulk=256)
    conn.drain_events(timeout=5)
    assert [m.payload["i"] for m in got] == [0, 1, 2]
    assert int(channel.client.llen(queue.name)) == 0
    for m in got:
        m.ack()


def wait_for(check: Any, timeout: float = 5) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    return check()


def test_after_a_reconnect_only_what_was_never_delivered_goes_back(conn: Connection) -> None:
    from celery import Celery

    queue = fill(conn, 2)
    node = f"re-{uuid.uuid4().hex[:6]}@t"
    channel, got = consume(conn, queue, prefetch=None, bulk=0, owner=node)
    conn.drain_events(timeout=5)  # the first message delivered (still running, unacked)
    conn.transport.cycle.on_poll_start()  # the second taken ...
    channel.client.connection.disconnect()  # ... its reply lost with the connection
    assert wait_for(lambda: len(held(channel).get(node, [])) == 2)
    lease = Lease(Celery(broker=conn.as_uri(include_password=True), set_as_current=False), node, 5)
    assert lease.put_back_undelivered(channel) == 1
    assert held(channel)[node] == [got[0].delivery_tag], "the delivered one stays held"
    assert int(channel.client.llen(queue.name)) == 1, "the undelivered one is back in its queue"
    got[0].ack()
