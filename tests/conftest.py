"""Shared fixtures: the embedded Redis (one per session) and broker selection."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_gpu.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


def _device_processes() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"celery_gpu.child" in cmdline:
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphan_device_processes() -> Iterator[None]:
    """After the whole session no device process may be left running (none orphaned, none leaked)."""
    before = _device_processes()
    yield
    deadline = time.monotonic() + 10
    while (left := _device_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"device processes left behind: {sorted(left)}"
