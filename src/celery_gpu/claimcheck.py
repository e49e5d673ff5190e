"""Claim check: large payloads travel out of band, the message carries a small reference.

:func:`wrap` leaves a payload below the threshold as it is; a larger one goes into a :class:`Store` under an
unguessable key with a TTL, and the message carries a reference instead: :data:`MAGIC` followed by msgpack
``{"key", "size", "sha256"}``. :func:`unwrap` fetches the payload back, checks its size and SHA-256, and
deletes it when asked. Results use the same two calls.

Stores: :class:`RedisStore` (by default the result backend's Redis) and :class:`FileStore`, a private
directory that only works when producers and workers share a filesystem (one machine: the embedded case).
:func:`store_for_app` picks one for a Celery app.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import msgpack

from celery_gpu.errors import ArrayDecodeError

logger = logging.getLogger("celery_gpu.claimcheck")

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_TTL",
    "MAGIC",
    "MAX_REDIS_VALUE",
    "ClaimCorrupt",
    "ClaimMissing",
    "FileStore",
    "RedisStore",
    "Store",
    "is_reference",
    "store_for_app",
    "unwrap",
    "wrap",
]

DEFAULT_THRESHOLD = 1024 * 1024  # bytes: smaller payloads stay in the message
DEFAULT_TTL = 24 * 3600  # seconds a stored payload is kept when nobody consumes it
MAGIC = b"\x00CGPUCLAIM1\x00"  # first bytes of a reference document
MAX_REDIS_VALUE = 512 * 1024 * 1024  # Redis's largest string (proto-max-bulk-len); larger values are chunked

_HEX_KEY = re.compile(r"[0-9a-f]{32}")


class ClaimMissing(ArrayDecodeError, LookupError):
    """A stored payload is gone: never stored here, expired (TTL), or already consumed and deleted."""


class ClaimCorrupt(ArrayDecodeError):
    """A reference is malformed, or the stored payload does not match its size or SHA-256."""


class Store(Protocol):
    """Where payloads are kept out of band."""

    def put(self, data: bytes | memoryview, ttl: float) -> str:
        """Store ``data`` for ``ttl`` seconds; returns its new key."""
        ...

    def get(self, key: str) -> bytes:
        """The data stored under ``key``; raises :class:`ClaimMissing` when absent or expired."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent key does nothing."""
        ...


class RedisStore:
    """Payloads as Redis strings with ``EX`` (whole seconds, at least 1), keys ``prefix`` + 32 random hex.

    A value above ``chunk_size`` (Redis's 512 MiB limit by default) is split into ``KEY:0`` .. ``KEY:n-1``
    with ``KEY:chunks`` holding ``n``, written in one transaction. ``client`` is a redis-py client that returns
    bytes (not ``decode_responses``).
    """

    def __init__(self, client: Any, prefix: str = "celery-gpu-claim:", *, chunk_size: int = MAX_REDIS_VALUE) -> None:
        pool = getattr(client, "connection_pool", None)
        if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
            raise ValueError("RedisStore needs a redis client without decode_responses=True")
        self.client = client
        self.prefix = prefix
        self.chunk_size = chunk_size

    @classmethod
    def from_url(cls, url: str, prefix: str = "celery-gpu-claim:", *, chunk_size: int = MAX_REDIS_VALUE) -> RedisStore:
        """A store on the Redis at ``url``: ``redis://``, ``rediss://``, ``unix://`` or ``redis+socket://``.

        For socket URLs the database is the ``db`` or (kombu's) ``virtual_host`` query parameter.
        """
        import redis

        parts = urlsplit(url)
        if parts.scheme in ("unix", "socket", "redis+socket"):
            query = parse_qs(parts.query)
            db = int((query.get("db") or query.get("virtual_host") or ["0"])[0])
            client = redis.Redis(unix_socket_path=parts.path, db=db, username=parts.username,
                                 password=parts.password)
        else:
            client = redis.Redis.from_url(url)
        return cls(client, prefix, chunk_size=chunk_size)

    def put(self, data: bytes | memoryview, ttl: float) -> str:
        """Store ``data`` for ``ttl`` seconds (rounded up, at least 1); returns its key."""
        key = self.prefix + secrets.token_hex(16)
        ex = max(1, math.ceil(ttl))
        view = memoryview(data).cast("B")
        if len(view) <= self.chunk_size:
            self.client.set(key, view, ex=ex)
            return key
        count = math.ceil(len(view) / self.chunk_size)
        with self.client.pipeline() as pipe:
            for i in range(count):
                pipe.set(f"{key}:{i}", view[i * self.chunk_size:(i + 1) * self.chunk_size], ex=ex)
            pipe.set(f"{key}:chunks", count, ex=ex)
            pipe.execute()
        return key

    def get(self, key: str) -> bytes:
        """The data stored under ``key``; :class:`ClaimMissing` when absent or expired."""
        self._check(key)
        value, count = self.client.mget([key, f"{key}:chunks"])
        if value is not None:
            return bytes(value)
        if count is None:
            raise ClaimMissing(f"claim {key!r} is not in Redis (expired, consumed, or never stored)")
        chunks = self.client.mget([f"{key}:{i}" for i in range(int(count))])
        if any(chunk is None for chunk in chunks):
            raise ClaimMissing(f"claim {key!r} lost chunks in Redis (expired)")
        return b"".join(chunks)

    def delete(self, key: str) -> None:
        """Remove ``key`` and its chunks, if any."""
        self._check(key)
        count = self.client.get(f"{key}:chunks")
        self.client.delete(key, f"{key}:chunks", *(f"{key}:{i}" for i in range(int(count or 0))))

    def _check(self, key: str) -> None:
        # Only this store's own keys: a forged reference must not read or delete other Redis keys.
        if not (key.startswith(self.prefix) and _HEX_KEY.fullmatch(key[len(self.prefix):])):
            raise ValueError(f"{key!r} is not a key of this claim store")


class FileStore:
    """Payloads as files in a private directory (mode 0700, files 0600), for one machine's processes.

    Files are named by their key (32 random hex) and written atomically (temp file + ``os.replace``). A
    file's mtime is set to its expiry time; :meth:`get` of an expired file deletes it and raises
    :class:`ClaimMissing`, :meth:`sweep` removes every expired one. Only works when producers and workers
    share this filesystem.
    """

    _TEMP_PREFIX = ".tmp-"
    _STALE_TEMP = 3600.0  # seconds after which a leftover temp file (a writer that died) is swept

    def __init__(self, directory: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.directory = os.fspath(directory)
        self.clock = clock
        try:
            os.mkdir(self.directory, 0o700)
            os.chmod(self.directory, 0o700)  # whatever the umask
        except FileExistsError:
            info = os.lstat(self.directory)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise PermissionError(
                    f"claim directory {self.directory!r} must be a directory owned by this user with mode 0700"
                ) from None

    def put(self, data: bytes | memoryview, ttl: float) -> str:
        """Store ``data`` for ``ttl`` seconds; returns its key."""
        key = secrets.token_hex(16)
        fd, temp = tempfile.mkstemp(prefix=self._TEMP_PREFIX, dir=self.directory)  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            expires = self.clock() + ttl
            os.utime(temp, (expires, expires))
            os.replace(temp, self._path(key))
        except BaseException:
            os.unlink(temp)
            raise
        return key

    def get(self, key: str) -> bytes:
        """The data stored under ``key``; :class:`ClaimMissing` when absent or expired (then deleted)."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                expired = os.fstat(f.fileno()).st_mtime <= self.clock()
                data = b"" if expired else f.read()
        except FileNotFoundError:
            raise ClaimMissing(f"claim {key!r} is not in {self.directory!r} (consumed, or never stored)") from None
        if expired:
            self.delete(key)
            raise ClaimMissing(f"claim {key!r} has expired")
        return data

    def delete(self, key: str) -> None:
        """Remove ``key``'s file, if any."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def sweep(self) -> int:
        """Remove expired files (and temp files left by dead writers); returns how many were removed."""
        now = self.clock()
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if _HEX_KEY.fullmatch(entry.name):
                    deadline = now
                elif entry.name.startswith(self._TEMP_PREFIX):
                    deadline = now - self._STALE_TEMP
                else:
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime <= deadline:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # consumed meanwhile
                    pass
        return removed

    def _path(self, key: str) -> str:
        if not _HEX_KEY.fullmatch(key):  # no path traversal, no other files of the directory
            raise ValueError(f"{key!r} is not a key of this claim store")
        return os.path.join(self.directory, key)


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


def _default_directory() -> str:
    return os.path.join(tempfile.gettempdir(), f"celery-gpu-claims-{os.getuid()}")


def store_for_app(app: Any) -> Store:
    """The store for a Celery app: its Redis result backend's client, else its Redis broker, else a FileStore.

    The FileStore (``<tempdir>/celery-gpu-claims-<uid>``) only works when producers and workers share a
    filesystem.
    """
    return redis_store_for_app(app) or FileStore(_default_directory())


def redis_store_for_app(app: Any) -> RedisStore | None:
    """The app's Redis result backend's client, else its Redis broker; None when it has neither."""
    from celery.backends.redis import RedisBackend

    if isinstance(app.backend, RedisBackend):
        return RedisStore(app.backend.client)
    broker = app.conf.broker_url
    if isinstance(broker, (list, tuple)):
        broker = broker[0] if broker else None
    if isinstance(broker, str):
        broker = broker.split(";")[0].strip()  # a failover list: the first one
        if urlsplit(broker).scheme in ("redis", "rediss", "redis+socket", "socket"):
            return RedisStore.from_url(broker)
    return None


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
        from .settings import Settings

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
