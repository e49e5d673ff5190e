"""Shared fixtures: the embedded Redis (one per session) and broker selection."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_gpu.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url
