"""Shared fixtures: the embedded Redis (one per session) and broker selection."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_gpu.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


#: Marks every process this test run starts (workers and device processes inherit the environment), so the
#: orphan check below counts only ours: two suites side by side on one machine do not fail each other.
RUN_MARK = "PYTEST_CELERY_GPU_RUN"
os.environ[RUN_MARK] = uuid.uuid4().hex
_MARK = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()


def _device_processes() -> set[int]:
    """Live device processes started by this test run."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"celery_gpu.device" not in cmdline:
                    continue
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if _MARK in environ.split(b"\0"):
                found.add(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_orphan_device_processes() -> Iterator[None]:
    """After the whole session no device process of this run may be left running (none orphaned, none leaked)."""
    before = _device_processes()
    yield
    deadline = time.monotonic() + 10
    while (left := _device_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"device processes left behind: {sorted(left)}"
