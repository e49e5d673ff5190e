"""Fixtures shared by the unit tests: isolated Celery apps and no global state leaking between tests."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from celery import Celery, _state, signals

from celery_gpu import GPU, devices
from celery_gpu.wire.frames import Channel

_app_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def _isolated_globals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what GPU(app) and @app.task register process-wide, reset the current device, clear env overrides."""
    for name in list(os.environ):
        if name.startswith("CELERY_GPU_"):
            monkeypatch.delenv(name)
    sig = signals.worker_init
    receivers = list(sig.receivers)
    finalizers = set(_state._on_app_finalizers)
    current = devices._current
    from celery_gpu.payload import claims as claimcheck

    claimcheck.configure(None)  # no claim-check unless a test turns it on
    claimcheck.defer_fetch(False)
    try:
        yield
    finally:
        with sig.lock:
            sig.receivers[:] = receivers
            sig.sender_receivers_cache.clear()
        _state._on_app_finalizers.clear()
        _state._on_app_finalizers.update(finalizers)
        devices.set_current(current)


@pytest.fixture
def make_app() -> Callable[..., Celery]:
    """Factory of Celery apps with unique main names that never become the current/default app."""

    def make(**conf: object) -> Celery:
        app = Celery(f"celery_gpu_unit_{next(_app_ids)}", set_as_current=False)
        if conf:
            app.conf.update(conf)
        return app

    return make


@pytest.fixture()
def gpu_app() -> tuple[Celery, GPU]:
    """An app (not the current one) with its GPU on one fake device."""
    app = Celery(f"unit-{next(_app_ids)}", set_as_current=False)
    app.conf.task_always_eager = False
    return app, GPU(app, devices="fake:1")


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """Two frame channels on a socketpair (10 s timeouts), closed afterwards."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    left, right = Channel(a), Channel(b)
    try:
        yield left, right
    finally:
        left.close()
        right.close()
