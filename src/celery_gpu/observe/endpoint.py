"""The worker's HTTP endpoint (``--metrics-port``, ``--metrics-address``): three paths, served from daemon threads.

==============  ===========================================================================================
path            answer
==============  ===========================================================================================
``/metrics``    the Prometheus metrics of the pool (:mod:`celery_gpu.observe.metrics`; 503 and a hint without
                the ``prometheus`` extra)
``/ready``      200 when the worker is ready (:mod:`celery_gpu.observe.health`: its consumer has connected and
                every device process takes work), else 503; a JSON body says what it waits for. A readiness probe.
``/health``     200 while the pool's loop publishes its snapshot (at most ``stale_after`` seconds old), else
                503: a liveness probe (a worker whose loop is stuck answers 503).
==============  ===========================================================================================

The endpoint never touches the pool: it reads a zero-argument callable that returns the pool's latest published
snapshot (or None before the pool has started).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .health import readiness
from .snapshot import Status

__all__ = ["PATHS", "STALE_AFTER", "Endpoint", "PortInUse", "Snapshot", "start_endpoint"]

logger = logging.getLogger("celery_gpu.metrics")

Snapshot = Callable[[], Status | None]
"""The pool's latest status snapshot, or None before the pool has started."""
#: Seconds after which a snapshot that was not renewed means the pool's loop is stuck (``/health`` says 503).
STALE_AFTER = 30.0
#: The paths the endpoint answers.
PATHS = ("/metrics", "/ready", "/health")
_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


class PortInUse(OSError):
    """The endpoint's port is already taken by another process (or another endpoint)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes and probes every few seconds are not worth a log line."""


def _json(start: _StartResponse, code: int, body: dict[str, Any]) -> Iterable[bytes]:
    status = "200 OK" if code == 200 else "503 Service Unavailable"
    start(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def _age(snap: Status | None) -> float | None:
    return None if snap is None else max(0.0, time.time() - float(snap["timestamp"]))


def _not_found(environ: dict[str, Any], start: _StartResponse) -> Iterable[bytes]:
    start("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def _app(snapshot: Snapshot, stale_after: float, metrics: WSGIApp) -> WSGIApp:
    def app(environ: dict[str, Any], start: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path not in ("/ready", "/health"):
            return metrics(environ, start)
        try:
            snap = snapshot()
        except Exception:
            logger.exception("celery-gpu endpoint: taking the pool snapshot failed")
            snap = None
        age = _age(snap)
        fresh = age is not None and age <= stale_after
        if path == "/health":
            return _json(start, 200 if fresh else 503, {"alive": fresh, "snapshot_age_s": age})
        ready, waiting = (snap["ready"], list(snap["waiting_for"])) if snap is not None else readiness(None)
        if snap is not None and not fresh:
            ready, waiting = False, [*waiting, f"the pool's snapshot is {age:.0f}s old: its loop is stuck"]
        return _json(start, 200 if ready else 503, {"ready": ready, "waiting_for": waiting})

    return app


class Endpoint:
    """A running endpoint (a daemon thread); :meth:`stop` shuts it down and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = int(server.server_port)
        self._stopped = False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)


def start_endpoint(port: int, snapshot: Snapshot, addr: str = "0.0.0.0",
                   stale_after: float = STALE_AFTER, metrics: WSGIApp = _not_found) -> Endpoint:
    """Serve ``metrics`` (the WSGI app of ``/metrics``, from :mod:`.metrics`; any other path but the two below gets
    it), ``/ready`` and ``/health`` at ``http://addr:port`` (``port=0``: any free port, see ``.port``). Raises
    :class:`PortInUse` when the port is taken."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    try:
        server = make_server(str(sockaddr[0]), port, _app(snapshot, stale_after, metrics), Server, handler_class=_Quiet)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(exc.errno, f"the metrics port {addr}:{port} is already in use") from exc
        raise
    thread = threading.Thread(target=server.serve_forever, name="celery-gpu-endpoint", daemon=True)
    thread.start()
    return Endpoint(server, thread)
