"""Brokers for the integration tests: the embedded Redis, the machine's Redis, its RabbitMQ.

A broker that is not reachable skips its tests on a laptop and fails them under ``CI=true``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672


@dataclass(frozen=True)
class Broker:
    name: str
    broker_url: str
    backend_url: str


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(host: str, port: int, what: str) -> None:
    """Skip (or, under CI=true, fail) when ``what`` is not listening."""
    if reachable(host, port):
        return
    message = f"{what} is not reachable at {host}:{port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


def make(name: str, embedded_url: str | None, db: int = 11) -> Broker:
    """The broker/backend pair for ``name`` (``embedded``, ``redis`` or ``rabbitmq``)."""
    if name == "embedded":
        assert embedded_url is not None
        return Broker(name, embedded_url, embedded_url)
    require(REDIS_HOST, REDIS_PORT, "Redis")
    redis_backend = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db + 1}"
    if name == "redis":
        return Broker(name, f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", redis_backend)
    require(RABBIT_HOST, RABBIT_PORT, "RabbitMQ")
    return Broker(name, f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}//", redis_backend)
