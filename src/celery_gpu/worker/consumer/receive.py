"""Receiving from Redis: atomically into the unacked index, in bulk.

kombu's Redis transport receives with ``BRPOP`` and then writes the message to the unacked index in a second
round trip: a main process that dies between the two loses the message (it is in neither the list nor the
index). On Redis >= 6.2 :func:`install` closes that window: the channel never pops a message into a reply.
It waits with ``BLMOVE key key RIGHT RIGHT`` (a rotation of a list onto itself: it returns the next message
*without removing it*), then takes up to ``1 + n`` messages (the prefetch window allowing) with one Lua
script that pops each and writes its unacked-index entry, and its owner (this worker, for
:mod:`.inflight`), in the same atomic step. A popped message is therefore always in its list or in the index,
however the worker dies; the index is what the visibility timeout and :mod:`.inflight` restore from.

While messages keep coming the script is sent straight away (no wait); only when it finds every list empty
does the next poll wait. ``BLMOVE`` waits on one list: with several (several queues, or kombu's priority
steps) it waits on the first of the rotated queues at its first priority step, for at most
:data:`MULTI_KEY_WAIT` seconds, so a message on another list waits that long at most on an idle worker.
An older Redis keeps kombu's ``BRPOP`` (the window open, logged once) with the bulk pop after each reply.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache
from queue import Empty  # what kombu's virtual transport raises for "nothing received"
from time import monotonic, time
from typing import Any

from celery import bootsteps

from .acks import keeps_unacked_index
from .inflight import DELIVERED, OWNERS, Lease, own_removals

__all__ = ["MULTI_KEY_WAIT", "BulkReceive", "atomic", "install", "installed"]

logger = logging.getLogger("celery_gpu.bulkrecv")

#: Longest wait (seconds) on one list of several before every list is looked at again.
MULTI_KEY_WAIT = 0.1


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
    """Whether ``channel`` receives through this module (atomically, or in bulk after ``BRPOP``)."""
    return atomic(channel) or getattr(channel, "_celery_gpu_bulk", 0) > 0


def atomic(channel: Any) -> bool:
    """Whether ``channel`` receives atomically into the unacked index (never a message in a reply only)."""
    return bool(getattr(channel, "_celery_gpu_atomic", False))


def install(channel: Any, n: int, owner: str | None = None) -> bool:
    """Make a kombu Redis ``channel`` receive atomically (Redis >= 6.2), up to ``1 + n`` messages a time.

    ``owner`` (the worker's node name) is recorded with each message for :mod:`.inflight`. On an older
    Redis the channel keeps ``BRPOP`` and takes up to ``n`` more messages after each reply (nothing for
    ``n < 1``). Returns False (and changes nothing) for other transports or for a channel whose QoS has no
    unacked index (``ack_emulation=False``: kombu pops and forgets, at most once).
    """
    if n < 0 or not keeps_unacked_index(channel):
        return False
    channel._celery_gpu_bulk = n
    channel._celery_gpu_owner = owner or ""
    if _has_lmove(channel):
        channel._celery_gpu_atomic = True
        channel._celery_gpu_sent = ""  # the command the BRPOP connection waits on: "wait" or "move"
        channel._celery_gpu_next = "move"  # the command the next poll sends
        channel._brpop_start = lambda timeout=None: _start(channel, timeout)
        channel.handlers["BRPOP"] = lambda **options: _read(channel, **options)
        if owner:
            own_removals(channel.qos)
        return True
    if n < 1:
        return False
    logger.warning("celery-gpu: Redis < 6.2 (no LMOVE): a worker killed between a BRPOP and its unacked-index "
                   "write loses that message")
    channel.handlers["BRPOP"] = lambda **options: _brpop_read(channel, **options)
    return True


def _has_lmove(channel: Any) -> bool:
    try:
        with channel.conn_or_acquire() as client:
            version = str(client.info("server").get("redis_version", "0"))
    except Exception:  # INFO refused (a managed Redis may rename it): assume a current server
        return True
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts))) >= (6, 2)


def _start(channel: Any, timeout: float | None = None) -> None:
    """kombu's ``Channel._brpop_start``: send the move (after a delivery) or the wait (after nothing)."""
    queues = channel._queue_cycle.consume(len(channel.active_queues))
    if not queues:
        return
    keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
    prefix = channel.global_keyprefix or ""
    channel._in_poll = channel.client.connection
    channel._brpop_sent_at = monotonic()
    if channel._celery_gpu_next == "move":
        qos = channel.qos
        want = 1 + _extra(channel)
        full = [prefix + k for k in keys] + [prefix + qos.unacked_key, prefix + qos.unacked_index_key,
                                             prefix + OWNERS]
        channel._celery_gpu_sent = "move"
        channel.client.connection.send_command("EVAL", _MOVE_AND_INDEX, len(full), *full, want, time(),
                                               channel._celery_gpu_owner)
    else:
        wait = channel.brpop_timeout if timeout is None else timeout
        if len(keys) > 1:
            wait = min(wait or MULTI_KEY_WAIT, MULTI_KEY_WAIT)
        key = prefix + keys[0]
        channel._celery_gpu_sent = "wait"
        channel.client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", wait or 0)


def _read(channel: Any, **options: Any) -> bool:
    """kombu's ``Channel._brpop_read`` for :func:`_start`'s commands: deliver what the move took."""
    sent = channel._celery_gpu_sent
    try:
        try:
            reply = channel.client.parse_response(channel.client.connection, "BLMOVE" if sent == "wait" else "EVAL",
                                                  **options)
        except channel.connection_errors:
            channel.client.connection.disconnect()  # the next poll reconnects
            channel._celery_gpu_next = "move"
            raise
        if sent != "move":  # the wait ended (a message is there, or the timeout): the next poll moves
            channel._celery_gpu_next = "move"
            raise Empty()
        if not reply:
            channel._celery_gpu_next = "wait"
            raise Empty()
        channel._celery_gpu_next = "move"
        _deliver_moved(channel, reply)
        return True
    finally:
        channel._in_poll = None
        flush = getattr(channel, "_flush_brpop_reauth", None)
        if flush is not None:
            flush()


# Pops up to ARGV[1] messages from KEYS[1..n-3] (in that order: kombu's priority order) and writes each to the
# unacked index (KEYS[n-2] hash, KEYS[n-1] sorted set, score ARGV[2]) and its owner ARGV[3] to the KEYS[n] hash
# (unless ARGV[3] is ""), as kombu's QoS.append would, in the same atomic step: a popped message is never in
# neither place, however the worker dies. Returns {list, message, indexed (1/0)} per message; a message
# without a delivery tag (not an envelope, or garbage) is returned unindexed.
_MOVE_AND_INDEX = """
local n = #KEYS - 3
local hash, index, owners = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local want, owner = tonumber(ARGV[1]), ARGV[3]
local function enc(v) if v == nil or v == cjson.null then return 'null' end return cjson.encode(v) end
local out = {}
for k = 1, n do
  while #out < want * 3 do
    local raw = redis.call('RPOP', KEYS[k])
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local indexed = 0
    if ok and type(msg) == 'table' and type(msg.properties) == 'table'
        and (type(msg.properties.delivery_tag) == 'string' or type(msg.properties.delivery_tag) == 'number') then
      local tag = msg.properties.delivery_tag
      local info = msg.properties.delivery_info
      if type(info) ~= 'table' then info = {} end
      redis.call('ZADD', index, ARGV[2], tag)
      redis.call('HSET', hash, tag, '[' .. raw .. ', ' .. enc(info.exchange) .. ', ' .. enc(info.routing_key) .. ']')
      if owner ~= '' then redis.call('HSET', owners, tag, owner) end
      indexed = 1
    end
    out[#out + 1] = KEYS[k]
    out[#out + 1] = raw
    out[#out + 1] = indexed
  end
  if #out >= want * 3 then break end
end
return out
"""


def _deliver_moved(channel: Any, reply: list[Any]) -> None:
    """Deliver the messages the move took, in order; a message that cannot be delivered is refused (logged,
    dropped: it was never a task) and the others go on."""
    k = _kombu()
    prefix = channel.global_keyprefix or ""
    todo: list[tuple[str, dict[str, Any]]] = []
    unindexed: list[tuple[str, dict[str, Any]]] = []
    for i in range(0, len(reply), 3):
        key, raw, indexed = k.bytes_to_str(reply[i])[len(prefix):], k.bytes_to_str(reply[i + 1]), reply[i + 2]
        dest = key.rsplit(channel.sep, 1)[0]
        payload = _decode(raw)
        if payload is None:
            _refuse(channel, dest, raw)
            continue
        todo.append((dest, payload))
        if not indexed:  # cjson could not read what Python can: index it here, before delivery
            unindexed.append((raw, payload))
    if unindexed:
        _write_index(channel, unindexed)
    if todo:
        channel._queue_cycle.rotate(todo[-1][0])
    DELIVERED.update(str(payload["properties"]["delivery_tag"]) for _, payload in todo)
    with _index_written(channel.qos):
        for i, (dest, payload) in enumerate(todo):
            try:
                channel.connection._deliver(payload, dest)
            except BaseException:
                _give_back(channel, [p for _, p in todo[i + 1:]])
                raise


def _decode(raw: str) -> dict[str, Any] | None:
    """The message's envelope, or None when it is not one kombu can deliver (garbage in the queue)."""
    try:
        payload = _kombu().loads(raw)
    except Exception:
        return None
    props = payload.get("properties") if isinstance(payload, dict) else None
    if not isinstance(props, dict) or props.get("delivery_tag") is None:
        return None
    return payload  # type: ignore[no-any-return]


def _refuse(channel: Any, dest: str, raw: str) -> None:
    """A message in ``dest`` that is no kombu envelope: logged and dropped (it is out of the list and in no
    index already), so the worker and the messages around it go on."""
    logger.error("celery-gpu: dropped a message in queue %r that is not a kombu message: %.200r", dest, raw)


def _write_index(channel: Any, messages: list[tuple[str, dict[str, Any]]]) -> None:
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for raw, payload in messages:
            _index(channel.qos, pipe, raw, payload)
            if channel._celery_gpu_owner:
                pipe.hset(OWNERS, payload["properties"]["delivery_tag"], channel._celery_gpu_owner)
        pipe.execute()


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
    """Consumer bootstep: the task consumer's Redis channel receives atomically, in bulk (``gpu_bulk_receive``
    messages more per round trip), each message's owner recorded, under the worker's in-flight lease
    (:class:`~.inflight.Lease`, taken at the first start). Runs again after every reconnect, on the new
    channel."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "celery-gpu bulk receive"

    def start(self, c: Any) -> None:
        from ...settings import Settings

        consumer = getattr(c, "task_consumer", None)
        channel = getattr(consumer, "channel", None)
        settings = Settings.from_app(c.app.conf)
        node = str(getattr(c, "hostname", "") or "")
        if channel is None or not install(channel, settings.bulk_receive, owner=node or None):
            return
        logger.debug("celery-gpu: receiving %s, up to %d extra messages a time",
                     "atomically" if atomic(channel) else "after BRPOP", settings.bulk_receive)
        if not (atomic(channel) and node):
            return
        lease = getattr(c, "_celery_gpu_lease", None)
        if lease is None:
            c._celery_gpu_lease = Lease(c.app, node, settings.inflight_lease)
            c._celery_gpu_lease.start()  # before the first receive: puts back what an earlier run held
            return
        try:  # a reconnect: before the new channel receives
            lease.put_back_undelivered(channel)
        except Exception:  # the broker went away again: the next reconnect tries again
            logger.warning("celery-gpu: could not look for messages lost with the connection", exc_info=True)

    def shutdown(self, c: Any) -> None:
        lease = getattr(c, "_celery_gpu_lease", None)
        if lease is not None:
            c._celery_gpu_lease = None
            lease.stop()
