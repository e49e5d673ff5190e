"""Where the pool's pipes are read: Celery's own event loop (the kombu hub) when the worker has one,
else one thread of the pool's. Either way a single thread owns the pool's state, so it needs no locks.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["HubLoop", "ThreadLoop"]

logger = logging.getLogger("celery_gpu.pool")
Callback = Callable[..., Any]


def call_safely(fn: Callback, *args: Any) -> None:
    """Run a callback; log (never propagate) what it raises so one bad callback cannot stop the loop."""
    try:
        fn(*args)
    except Exception:
        logger.exception("celery-gpu: callback %r failed", fn)


class HubLoop:
    """Adapter over the worker's kombu hub; everything already runs on the hub's thread."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def add_reader(self, fd: int, cb: Callback, *args: Any) -> None:
        self.hub.add_reader(fd, cb, *args)

    def remove_reader(self, fd: int) -> None:
        try:
            self.hub.remove_reader(fd)
        except Exception:  # the hub may already be closed during shutdown
            pass

    def call_repeatedly(self, seconds: float, cb: Callback) -> None:
        self.hub.call_repeatedly(seconds, cb)

    def call_later(self, seconds: float, cb: Callback, *args: Any) -> None:
        self.hub.call_later(seconds, cb, *args)

    def run(self, fn: Callback, *args: Any) -> None:
        """Run ``fn`` on the loop's thread: the caller is on it already."""
        fn(*args)

    def stop(self) -> None:
        """Nothing to stop: the hub belongs to the worker."""


class ThreadLoop:
    """A selector loop in one daemon thread, for workers running without an event loop."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, (self._drain_wake, ()))
        self._calls: deque[tuple[Callback, tuple[Any, ...]]] = deque()
        self._timers: list[list[Any]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add_reader(self, fd: int, cb: Callback, *args: Any) -> None:
        self._sel.register(fd, selectors.EVENT_READ, (cb, args))

    def remove_reader(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def call_repeatedly(self, seconds: float, cb: Callback) -> None:
        self._timers.append([seconds, time.monotonic() + seconds, cb, ()])

    def call_later(self, seconds: float, cb: Callback, *args: Any) -> None:
        """Run ``cb(*args)`` once, ``seconds`` from now, on the loop's thread (call it from that thread)."""
        self._timers.append([None, time.monotonic() + seconds, cb, args])

    def run(self, fn: Callback, *args: Any) -> None:
        """Queue ``fn`` to run on the loop's thread (safe from any thread)."""
        self._calls.append((fn, args))
        self._wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="celery-gpu-pool", daemon=True)
        self._thread.start()

    def stop(self, final: Callback | None = None, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it (up to ``timeout`` seconds); calls queued before are run first, then
        ``final``, on the thread, as its last work.

        The pool's warm shutdown is such a ``final``: the device processes this thread started (respawns) get
        ``PR_SET_PDEATHSIG`` from it, and the kernel sends that signal when this *thread* ends, so it must
        outlive them.
        """
        if final is not None:
            self._calls.append((final, ()))
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        elif final is not None and self._thread is None:  # never started: nothing else will run it
            self._calls.remove((final, ()))
            final()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            timeout = max(0.0, min(t[1] for t in self._timers) - now) if self._timers else None
            for key, _ in self._sel.select(timeout):
                cb, args = key.data
                call_safely(cb, *args)
            while self._calls:
                fn, args = self._calls.popleft()
                call_safely(fn, *args)
            now = time.monotonic()
            for timer in list(self._timers):
                if now >= timer[1]:
                    if timer[0] is None:
                        self._timers.remove(timer)
                    else:
                        timer[1] = now + timer[0]
                    call_safely(timer[2], *timer[3])
        while self._calls:
            fn, args = self._calls.popleft()
            call_safely(fn, *args)
