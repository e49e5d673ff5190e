"""Who holds each unacked message on Redis, and putting back what a dead worker held.

kombu's unacked index (``unacked`` hash, ``unacked_index`` sorted set) says what was received and not acked,
not by whom: a dead worker's messages come back only after the visibility timeout (an hour by default), and
a worker restarted after a kill finds its own there too. Atomic receive (:mod:`.receive`) writes each
message's owner, the worker's node name, in :data:`OWNERS` (a hash: delivery tag -> node name) in the step
that pops it; every removal from the unacked index (ack, reject, restore) removes it from there too
(:func:`own_removals`).

Each worker holds a lease, the key ``celery-gpu.lease.<node>`` with a time to live of ``gpu_inflight_lease``
seconds, renewed every fifth of that by a thread of its own (:class:`Lease`). That thread also looks for
owners whose lease is gone (the worker died, or lost its link to the broker for the whole lease) and puts
their messages back in their queues, as kombu's restore does, one transaction each that checks the owner
again (a message acked or taken by another worker meanwhile is left alone). At start, before it receives
anything, a worker puts back what an earlier run under its own node name still held: that run is dead
(Celery's node names are unique among live workers). After a reconnect it puts back what it took and never
delivered (a move whose reply was lost with the connection: the tags it holds that are not in
:data:`DELIVERED`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

__all__ = ["DELIVERED", "LEASE_PREFIX", "OWNERS", "Lease", "own_removals"]

logger = logging.getLogger("celery_gpu.inflight")

#: Hash: delivery tag -> node name of the worker holding that unacked message.
OWNERS = "celery-gpu.inflight"
#: Prefix of each worker's lease key (its node name follows).
LEASE_PREFIX = "celery-gpu.lease."


#: Delivery tags this process received and handed to Celery, not yet acked, rejected or restored.
DELIVERED: set[str] = set()


def own_removals(qos: Any) -> None:
    """Make every removal of a message from ``qos``'s unacked index remove its owner too, in the same step."""
    if getattr(qos, "_celery_gpu_owners", False):
        return
    remove = qos._remove_from_indices

    def remove_with_owner(delivery_tag: Any, pipe: Any = None) -> Any:
        DELIVERED.discard(str(delivery_tag))
        return remove(delivery_tag, pipe).hdel(OWNERS, delivery_tag)

    qos._remove_from_indices = remove_with_owner
    qos._celery_gpu_owners = True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def held(channel: Any) -> dict[str, list[str]]:
    """Node name -> delivery tags of the unacked messages it holds."""
    prefix = channel.global_keyprefix or ""
    with channel.conn_or_acquire() as client:
        owners = client.hgetall(prefix + OWNERS)  # HGETALL: kombu does not prefix it
    by_node: dict[str, list[str]] = {}
    for tag, node in owners.items():
        by_node.setdefault(_text(node), []).append(_text(tag))
    return by_node


def restore(channel: Any, node: str, tags: list[str]) -> int:
    """Put the messages ``node`` holds among ``tags`` back in their queues; returns how many went back."""
    from kombu.utils.json import loads

    back = 0
    with channel.conn_or_acquire() as client:
        for tag in tags:
            def put_back(pipe: Any, tag: str = tag) -> bool:
                owner = pipe.hget(OWNERS, tag)
                if owner is None or _text(owner) != node:  # acked, or taken again by another worker meanwhile
                    return False
                raw = pipe.hget(channel.unacked_key, tag)
                pipe.multi()
                pipe.zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag).hdel(OWNERS, tag)
                if raw:
                    message, exchange, routing_key = loads(_text(raw))  # type: ignore[no-untyped-call]
                    channel._do_restore_message(message, exchange, routing_key, pipe, False)
                return bool(raw)

            if client.transaction(put_back, OWNERS, channel.unacked_key, value_from_callable=True):
                back += 1
    return back


class Lease:
    """A worker's lease on the messages it holds, and the recovery of dead workers' messages (a thread)."""

    def __init__(self, app: Any, node: str, seconds: float) -> None:
        self.app, self.node, self.seconds = app, node, seconds
        self.restored = 0  # messages put back so far (own at start, and dead workers')
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def _channel(self) -> Any:
        if self._conn is None:
            self._conn = self.app.connection_for_read()
        return self._conn.default_channel

    def start(self) -> None:
        """Take the lease, put back what an earlier run of this node held, then keep the lease renewed."""
        try:
            self.renew()
            channel = self._channel()
            self.restored += restore(channel, self.node, held(channel).get(self.node, []))
            if self.restored:
                logger.warning("celery-gpu: put back %d messages an earlier run of %s held", self.restored, self.node)
        except Exception:  # the broker is away: the thread tries again
            logger.warning("celery-gpu: could not take the in-flight lease yet", exc_info=True)
        self._thread = threading.Thread(target=self._run, name="celery-gpu-lease", daemon=True)
        self._thread.start()

    def put_back_undelivered(self, channel: Any) -> int:
        """After a reconnect: put back what this worker took and never delivered (the reply of a move lost
        with the connection); what it delivered and still runs stays its own. Returns how many went back."""
        lost = [t for t in held(channel).get(self.node, []) if t not in DELIVERED]
        back = restore(channel, self.node, lost) if lost else 0
        if back:
            logger.warning("celery-gpu: put back %d messages taken just before the connection was lost", back)
        self.restored += back
        return back

    def renew(self) -> None:
        """Set the lease key with its time to live."""
        with self._channel().conn_or_acquire() as client:
            client.set(LEASE_PREFIX + self.node, str(os.getpid()), px=max(int(self.seconds * 1000), 1))

    def recover(self) -> int:
        """Put back the messages of every owner whose lease is gone; returns how many went back."""
        channel = self._channel()
        prefix = channel.global_keyprefix or ""
        back = 0
        for node, tags in held(channel).items():
            if node == self.node:
                continue
            with channel.conn_or_acquire() as client:
                if client.exists(prefix + LEASE_PREFIX + node):
                    continue
            n = restore(channel, node, tags)
            if n:
                logger.warning("celery-gpu: put back %d messages held by %s (its lease lapsed)", n, node)
            back += n
        self.restored += back
        return back

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.seconds / 5):
            try:
                self.renew()
                self.recover()
                failing = False
            except Exception as exc:
                if not failing:
                    logger.warning("celery-gpu: in-flight lease not renewed: %r", exc)
                failing = True

    def stop(self) -> None:
        """Stop renewing and give the lease up (what is still held is put back by the next worker to look)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            with self._channel().conn_or_acquire() as client:
                client.delete(LEASE_PREFIX + self.node)
        except Exception:
            logger.debug("celery-gpu: could not give the lease up", exc_info=True)
        if self._conn is not None:
            self._conn.release()
            self._conn = None
