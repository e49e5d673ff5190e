"""Waiting for Celery results from an asyncio server without blocking its event loop.

``AsyncResult.get()`` blocks its thread until the result arrives. Called in an ``async def`` handler it would
stop the whole server (every other request included) for that long; a thread per waiting request works but
holds a thread and a result connection per request. Here one thread of our own sends every task and
collects every result:

- a request hands the bridge a function that sends its tasks (``submit_many``, ``apply_async``) and awaits a
  future;
- the bridge's thread calls it (Celery's Redis and rpc backends subscribe to a task's result *before* its
  message leaves, so no result can be missed), asks for each result with ``AsyncResult.then``, and drains its
  backend's result consumer (results are pushed to it: Redis pub/sub, or the rpc reply queue);
- when every result of a request has arrived, or its deadline has passed, the bridge resolves the request's
  future on the request's event loop.

The loop never touches the broker or the backend. It needs a backend that pushes results: Redis (also the
embedded one) or ``rpc://`` (the bridge sends the tasks, so their replies come back to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import states

DRAIN_S = 0.002  # longest wait on the result connection before new requests are picked up
EXPIRE_EVERY_S = 0.05  # how often deadlines are checked


class TaskFailed(Exception):
    """A task of the request failed (or was revoked): its exception's type name and message."""

    def __init__(self, task_id: str, state: str, error: str) -> None:
        super().__init__(f"task {task_id} ended {state}: {error}")
        self.task_id, self.state, self.error = task_id, state, error


class NoAnswer(TimeoutError):
    """Not every result arrived before the request's deadline (no worker took the tasks, or not in time)."""


@dataclass
class _Request:
    send: Callable[[], Sequence[Any]]
    deadline: float
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    results: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    remaining: int = 0


class CeleryBridge:
    """One thread that sends tasks and collects their results for any number of waiting coroutines.

    ``await bridge.run(send, timeout)`` returns the values of the results ``send()`` returned, in order, or raises
    :class:`NoAnswer` after ``timeout`` seconds or :class:`TaskFailed` when a task failed.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: dict[int, _Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="celery-bridge", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; requests still waiting end with :class:`NoAnswer`."""
        if self._thread is not None:
            self._stopping.set()
            self._inbox.put(None)
            self._thread.join(timeout)
            self._thread = None

    async def run(self, send: Callable[[], Sequence[Any]], timeout: float) -> list[Any]:
        """Call ``send`` on the bridge's thread and wait (without blocking the loop) for the values of the
        ``AsyncResult``s it returns."""
        if self._thread is None or self._stopping.is_set():
            raise RuntimeError("the Celery bridge is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._inbox.put(_Request(send, time.monotonic() + timeout, future, loop))
        return await future

    # Everything below runs on the bridge's thread.

    def _serve(self) -> None:
        backend = self.app.backend  # this thread's own backend instance (Celery keeps one per thread)
        next_expiry = 0.0
        while not self._stopping.is_set():
            self._take(block=not self._waiting)
            if self._waiting:
                with contextlib.suppress(socket.timeout, TimeoutError):
                    backend.result_consumer.drain_events(timeout=DRAIN_S)
            now = time.monotonic()
            if now >= next_expiry:
                self._expire(now)
                next_expiry = now + EXPIRE_EVERY_S
        for request in list(self._waiting.values()):
            self._finish(request, NoAnswer("the server is shutting down"))

    def _take(self, block: bool) -> None:
        """Start every request in the inbox (waiting up to half a second for one when ``block``)."""
        try:
            request = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while request is not None:
                self._start(request)
                request = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _start(self, request: _Request) -> None:
        try:
            request.results = list(request.send())
        except Exception as exc:  # the broker refused or is unreachable: the request fails with that error
            self._finish(request, exc)
            return
        request.values = [None] * len(request.results)
        request.remaining = len(request.results)
        self._waiting[id(request)] = request
        if not request.results:
            self._finish(request, None)
        for index, result in enumerate(request.results):
            result.then(self._arrived(request, index))

    def _arrived(self, request: _Request, index: int) -> Callable[[Any], None]:
        def arrived(result: Any) -> None:
            if id(request) not in self._waiting:
                return  # the request ended already (deadline, or another of its tasks failed)
            if result.state != states.SUCCESS:
                error = result.result
                self._finish(request, TaskFailed(result.id, result.state, f"{type(error).__name__}: {error}"))
                return
            request.values[index] = result.result
            request.remaining -= 1
            if request.remaining == 0:
                self._finish(request, None)

        return arrived

    def _expire(self, now: float) -> None:
        for request in [r for r in self._waiting.values() if r.deadline <= now]:
            done = len(request.results) - request.remaining
            self._finish(request, NoAnswer(f"{done} of {len(request.results)} results arrived in time"))

    def _finish(self, request: _Request, error: BaseException | None) -> None:
        self._waiting.pop(id(request), None)
        if error is not None:  # stop listening for the rest (a result that never comes would be kept for ever)
            for result in request.results:
                result.backend.remove_pending_result(result)
        with contextlib.suppress(RuntimeError):  # its event loop is closed already: nobody waits any more
            request.loop.call_soon_threadsafe(_resolve, request.future, request.values, error)


def _resolve(future: asyncio.Future[list[Any]], values: list[Any], error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled (its client went away)
        return
    if error is None:
        future.set_result(values)
    else:
        future.set_exception(error)
