"""Receiving from Redis in bulk: after each ``BRPOP`` reply, up to ``n`` more messages in one round trip.

kombu's Redis transport receives one message per ``BRPOP`` and then writes it to the unacked index with a
second, synchronous round trip: two round trips in the worker's main process for every task, which caps how
fast a worker can fill batches. When the reply of a ``BRPOP`` arrives, :func:`install`'s reader also pops up
to ``n`` more messages from the same list and writes them to the unacked index in the same atomic step (a
Lua script), in the round trip that indexes the first message, *before* any is handed to Celery (so an early
ack never races the index write). Then each message is delivered exactly as kombu would deliver it. The
prefetch window is respected: never more than the channel's QoS still allows. The popped messages are
unacked (restored on a lost worker after the visibility timeout, as always); the only window in which a
message is in neither the list nor the index is the one kombu itself has for the message of each ``BRPOP``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache
from queue import Empty  # what kombu's virtual transport raises for "nothing received"
from time import time
from typing import Any

from celery import bootsteps

from .acks import keeps_unacked_index

__all__ = ["BulkReceive", "install", "installed"]

logger = logging.getLogger("celery_gpu.bulkrecv")


@cache
def _kombu() -> Any:
    """kombu's JSON, bytes and virtual-transport helpers (untyped: reached through ``Any``)."""
    import kombu.transport.virtual.base as virtual
    import kombu.utils.encoding as encoding
    import kombu.utils.json as kjson

    class Helpers:
        loads, dumps, bytes_to_str = kjson.loads, kjson.dumps, encoding.bytes_to_str
        QoS = virtual.QoS

    return Helpers


def installed(channel: Any) -> bool:
    """Whether ``channel`` receives in bulk."""
    return getattr(channel, "_celery_gpu_bulk", 0) > 0


def install(channel: Any, n: int) -> bool:
    """Make a kombu Redis ``channel`` receive up to ``n`` extra messages per ``BRPOP`` reply.

    Returns False (and changes nothing) for other transports, for ``n < 1``, or for a channel whose QoS has no
    unacked index (``ack_emulation=False``: kombu's plain receive costs one round trip there already).
    """
    if n < 1 or not keeps_unacked_index(channel):
        return False
    channel._celery_gpu_bulk = n
    channel.handlers["BRPOP"] = lambda **options: _brpop_read(channel, **options)
    return True


def _extra(channel: Any) -> int:
    """How many more messages the channel may take now (besides the one just received)."""
    allowed = channel.qos.can_consume_max_estimate()  # None: no prefetch limit
    room = int(channel._celery_gpu_bulk if allowed is None else min(channel._celery_gpu_bulk, allowed - 1))
    return max(room, 0)


def _brpop_read(channel: Any, **options: Any) -> bool:
    """kombu's ``Channel._brpop_read``, taking up to ``n`` more messages from the list that answered."""
    k = _kombu()
    try:
        try:
            dest__item = channel.client.parse_response(channel.client.connection, "BRPOP", **options)
        except channel.connection_errors:
            channel.client.connection.disconnect()  # the next poll reconnects
            raise
        if not dest__item:
            raise Empty()
        key, item = dest__item
        dest = k.bytes_to_str(key).rsplit(channel.sep, 1)[0]
        channel._queue_cycle.rotate(dest)
        first = k.bytes_to_str(item)
        payloads = [k.loads(first)]
        payloads.extend(_take_more(channel, key, (first, payloads[0]), _extra(channel)))
        with _index_written(channel.qos):
            for i, payload in enumerate(payloads):
                try:
                    channel.connection._deliver(payload, dest)
                except BaseException:
                    _give_back(channel, payloads[i + 1:])
                    raise
        return True
    finally:
        channel._in_poll = None
        flush = getattr(channel, "_flush_brpop_reauth", None)
        if flush is not None:
            flush()


# Pops up to ARGV[1] messages from KEYS[1] and writes each to the unacked index (KEYS[2] hash, KEYS[3] sorted
# set, score ARGV[2]) in the same atomic step, as kombu's QoS.append would: a popped message is never in
# neither place, however the worker dies. A message without a delivery tag is returned unindexed (kombu
# fails it on delivery, as it would have).
_POP_AND_INDEX = """
local function enc(v) if v == nil then return 'null' end return cjson.encode(v) end
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg.properties) == 'table' and msg.properties.delivery_tag then
    local tag = msg.properties.delivery_tag
    local info = msg.properties.delivery_info
    if type(info) ~= 'table' then info = {} end
    redis.call('ZADD', KEYS[3], ARGV[2], tag)
    redis.call('HSET', KEYS[2], tag, '[' .. raw .. ', ' .. enc(info.exchange) .. ', ' .. enc(info.routing_key) .. ']')
  end
  out[#out + 1] = raw
end
return out
"""


def _take_more(channel: Any, key: Any, first: tuple[str, dict[str, Any]], extra: int) -> list[dict[str, Any]]:
    """Write the unacked index of the message just received, and pop up to ``extra`` more messages from
    ``key`` with their index entries written in the same atomic step (one round trip in all)."""
    k = _kombu()
    qos = channel.qos
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        _index(qos, pipe, *first)
        if extra:
            script = getattr(channel, "_celery_gpu_pop", None)
            if script is None:
                script = channel._celery_gpu_pop = client.register_script(_POP_AND_INDEX)
            script(keys=[key, qos.unacked_key, qos.unacked_index_key], args=[extra, time()], client=pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        finally:
            pipe.reset()
    for reply in replies:  # the index of the first message, or the pop: kombu's failure, raised as such
        if isinstance(reply, Exception):
            raise reply
    popped = replies[2] if extra else None
    return [k.loads(k.bytes_to_str(raw)) for raw in popped or ()]


def _give_back(channel: Any, payloads: list[dict[str, Any]]) -> None:
    """Return popped messages that were never delivered to their queue at once (not after the visibility
    timeout)."""
    for payload in reversed(payloads):  # each goes back to the consuming end: the first ends up next again
        try:
            channel.qos.restore_by_tag(payload["properties"]["delivery_tag"])
        except Exception:  # still in the unacked index: restored after the visibility timeout
            logger.exception("celery-gpu: could not return an undelivered message to its queue")


def _index(qos: Any, pipe: Any, raw: str, payload: dict[str, Any]) -> None:
    """Queue the unacked-index writes of one message, as kombu's Redis ``QoS.append`` does (the entry is the
    JSON ``[message, exchange, routing_key]``, built around the message's JSON as received, not re-encoded)."""
    k = _kombu()
    props = payload["properties"]
    info = props.get("delivery_info") or {}
    tag = props["delivery_tag"]
    pipe.zadd(qos.unacked_index_key, {tag: time()})
    pipe.hset(qos.unacked_key, tag, f"[{raw}, {k.dumps(info.get('exchange'))}, {k.dumps(info.get('routing_key'))}]")


@contextmanager
def _index_written(qos: Any) -> Any:
    """Inside, ``qos.append`` keeps kombu's in-memory bookkeeping only: the index was written already."""
    virtual_append = _kombu().QoS.append
    qos.append = lambda message, delivery_tag: virtual_append(qos, message, delivery_tag)
    try:
        yield
    finally:
        del qos.append


class BulkReceive(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: the task consumer's Redis channel receives in bulk (``gpu_bulk_receive`` messages
    per extra round trip; 0 turns it off). Runs again after every reconnect, on the new channel."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "celery-gpu bulk receive"

    def start(self, c: Any) -> None:
        from ...settings import Settings

        consumer = getattr(c, "task_consumer", None)
        channel = getattr(consumer, "channel", None)
        n = Settings.from_app(c.app.conf).bulk_receive
        if channel is not None and install(channel, n):
            logger.debug("celery-gpu: receiving up to %d extra messages per BRPOP", n)
