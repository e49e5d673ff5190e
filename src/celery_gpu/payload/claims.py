"""Claim check: large payloads travel out of band, the message carries a small reference.

:func:`wrap` leaves a payload below the threshold as it is; a larger one goes into a store
(:mod:`celery_gpu.payload.stores`) under an unguessable key with a TTL, and the message carries a reference
instead: :data:`MAGIC` followed by msgpack ``{"key", "size", "sha256"}`` (and optionally a *skeleton*, a small
stand-in for the payload). :func:`unwrap` fetches the payload back, checks its size and SHA-256, and deletes it
when asked. Results use the same two calls.

The second half is this process's configuration, which the arrays serializer reads: ``GPU(app)`` points it at
the app's Redis (:func:`configure_for_app`); with no Redis the claim-check is off unless a store is configured
explicitly (:func:`configure`). The worker's main process decodes references to their skeleton and never
fetches a payload (:func:`defer_fetch`); the device process deletes a payload once its task has ended
(:func:`consumed`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import ClaimCorrupt, ClaimForged, ClaimMissing
from .stores import FileStore, RedisStore, Store, redis_store_for_app

logger = logging.getLogger("celery_gpu.claimcheck")

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_TTL",
    "MAGIC",
    "ClaimCorrupt",
    "ClaimForged",
    "ClaimMissing",
    "FileStore",
    "RedisStore",
    "Store",
    "configure",
    "configure_for_app",
    "consumed",
    "defer_fetch",
    "fetch_deferred",
    "is_reference",
    "key_of",
    "redis_store_for_app",
    "skeleton_of",
    "skeleton_or_refuse",
    "store",
    "threshold",
    "ttl",
    "unwrap",
    "wrap",
]

DEFAULT_THRESHOLD = 1024 * 1024  # bytes: smaller payloads stay in the message
DEFAULT_TTL = 24 * 3600  # seconds a stored payload is kept when nobody consumes it
MAGIC = b"\x00CGPUCLAIM1\x00"  # first bytes of a reference document


def is_reference(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is a reference made by :func:`wrap` (not a payload)."""
    return bytes(data[:len(MAGIC)]) == MAGIC


def wrap(payload: bytes, store: Store, threshold: int = DEFAULT_THRESHOLD, ttl: float = DEFAULT_TTL,
         skeleton: bytes | None = None) -> bytes:
    """``payload`` itself when shorter than ``threshold``; otherwise stores it and returns a reference.

    A payload that happens to start with :data:`MAGIC` is always stored, so :func:`unwrap` never misreads it.
    ``skeleton``, when given, rides in the reference: a small stand-in for the payload that a process which
    must not fetch it (the worker's main process) can decode instead.
    """
    if len(payload) < threshold and not is_reference(payload):
        return payload
    key = store.put(payload, ttl)
    doc: dict[str, Any] = {"key": key, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    if skeleton is not None:
        doc["skeleton"] = skeleton
    ref: bytes = msgpack.packb(doc, use_bin_type=True)
    return MAGIC + ref


def _reference(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        ref = msgpack.unpackb(bytes(data[len(MAGIC):]), raw=False)
    except Exception as exc:
        raise ClaimCorrupt(f"malformed claim reference: {exc}") from None
    if not isinstance(ref, dict):
        raise ClaimCorrupt(f"malformed claim reference: {ref!r}")
    return ref


def skeleton_of(data: bytes | bytearray | memoryview) -> bytes | None:
    """The stand-in carried by a reference, if any."""
    skeleton = _reference(data).get("skeleton")
    return skeleton if isinstance(skeleton, bytes) else None


def skeleton_or_refuse(data: bytes | bytearray | memoryview) -> bytes:
    """The stand-in carried by a reference, for a process that must not fetch payloads (the worker's main
    process, :func:`defer_fetch`); a reference without one is refused (:class:`ClaimCorrupt`), never fetched:
    every task body the arrays serializer stores out of band carries its skeleton."""
    skeleton = skeleton_of(data)
    if skeleton is None:
        raise ClaimCorrupt("a claim reference without a skeleton: this process (the worker's main process) never "
                           "fetches a payload, and a task body stored out of band always carries its skeleton")
    return skeleton


def key_of(data: bytes | bytearray | memoryview) -> str | None:
    """The store key a reference names; None for a payload that is not a reference."""
    if not is_reference(data):
        return None
    key = _reference(data).get("key")
    return key if isinstance(key, str) else None


Blob = bytes | bytearray | memoryview


def unwrap(data: Blob, store: Store, *, delete: bool = False) -> Blob:
    """``data`` unchanged unless it is a reference; then the stored payload, checked (and deleted if asked).

    Raises :class:`ClaimMissing` when the payload is gone, :class:`ClaimCorrupt` when the reference is
    malformed or the payload does not match its size or SHA-256.
    """
    if not is_reference(data):
        return data
    ref = _reference(data)
    try:
        key, size, digest = ref["key"], ref["size"], ref["sha256"]
    except KeyError as exc:
        raise ClaimCorrupt(f"malformed claim reference: missing {exc}") from None
    if not (isinstance(key, str) and isinstance(size, int) and isinstance(digest, str)):
        raise ClaimCorrupt(f"malformed claim reference: {ref!r}")
    payload = store.get(key)
    if len(payload) != size:
        raise ClaimCorrupt(f"claim {key!r} holds {len(payload)} bytes, the reference says {size}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ClaimCorrupt(f"claim {key!r} does not match its SHA-256")
    if delete:
        store.delete(key)
    return payload


# -- the process-wide configuration used by the arrays serializer --------------------------------------------


class _Config:
    def __init__(self) -> None:
        self.factory: Callable[[], Store] | None = None
        self.store: Store | None = None
        self.threshold = DEFAULT_THRESHOLD
        self.ttl: float = DEFAULT_TTL
        self.deferred = False
        self.app: Any = None  # configure_for_app: settings read on first use, after the app is configured


_config = _Config()


def configure(factory: Callable[[], Store] | None, threshold: int = DEFAULT_THRESHOLD,
              ttl: float = DEFAULT_TTL) -> None:
    """Turn the claim-check on for this process (``factory`` makes the store on first use); None or a
    threshold of 0 turns it off. ``GPU(app)`` calls it with the app's store and settings."""
    _config.app = None
    _config.factory = factory if threshold > 0 else None
    _config.store = None
    _config.threshold = threshold
    _config.ttl = ttl


def configure_for_app(app: Any) -> None:
    """Use ``app``'s Redis (:func:`redis_store_for_app`) and its ``claim_threshold`` / ``claim_ttl`` settings,
    read when first needed (so a configuration loaded after ``GPU(app)`` still counts). An app with no Redis
    (neither backend nor broker) gets no claim-check: a directory is only shared when the user says so
    (``configure(lambda: FileStore(path), ...)``)."""
    _config.app = app
    _config.factory = None
    _config.store = None


def _resolve_app() -> None:
    app, _config.app = _config.app, None
    if app is not None:
        from ..settings import Settings

        settings = Settings.from_app(app.conf)
        redis = redis_store_for_app(app) if settings.claim_threshold > 0 else None
        configure((lambda: redis) if redis is not None else None, settings.claim_threshold, settings.claim_ttl)


def threshold() -> int | None:
    """The payload size from which the claim-check stores out of band; None when it is off."""
    _resolve_app()
    return _config.threshold if _config.factory is not None else None


def ttl() -> float:
    _resolve_app()
    return _config.ttl


def store() -> Store:
    """The configured store (made on first use)."""
    _resolve_app()
    if _config.store is None:
        if _config.factory is None:
            raise ClaimMissing("a claim reference arrived but no claim store is configured in this process")
        _config.store = _config.factory()
    return _config.store


def defer_fetch(flag: bool = True) -> None:
    """In the worker's main process: decode references to their skeleton instead of fetching the payload (the
    device process fetches it)."""
    _config.deferred = flag


def fetch_deferred() -> bool:
    return _config.deferred


def consumed(body: Any) -> None:
    """The task whose message body is ``body`` has ended: delete its stored payload, if it had one (best effort;
    the TTL removes it otherwise)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        return
    try:
        key = key_of(body)
        if key is not None:
            store().delete(key)
    except Exception:  # the store is down or the reference odd: the TTL cleans up
        logger.debug("celery-gpu: could not delete a consumed claim", exc_info=True)
