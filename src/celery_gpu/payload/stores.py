"""Where out-of-band payloads are kept: a :class:`Store` is ``put`` / ``get`` / ``delete`` of bytes under an
unguessable key with a TTL.

:class:`RedisStore` (by default the app's Redis: its result backend's client, else its broker,
:func:`redis_store_for_app`) and :class:`FileStore`, a private directory that only works when producers and
workers share a filesystem, and is only used when configured explicitly (design decision 23).
"""

from __future__ import annotations

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

from ..errors import ClaimForged, ClaimMissing

__all__ = ["MAX_REDIS_VALUE", "FileStore", "RedisStore", "Store", "redis_store_for_app"]

MAX_REDIS_VALUE = 512 * 1024 * 1024  # Redis's largest string (proto-max-bulk-len); larger values are chunked

_HEX_KEY = re.compile(r"[0-9a-f]{32}")


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
            raise ClaimForged(f"{key!r:.100} is not a key of this claim store")


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
            raise ClaimForged(f"{key!r:.100} is not a key of this claim store")
        return os.path.join(self.directory, key)


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
