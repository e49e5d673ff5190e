"""Brokers for the integration tests: the embedded Redis, the machine's Redis, its RabbitMQ.

A broker that is not reachable skips its tests on a laptop and fails them under ``CI=true``.

Which servers the suite uses (README, "Run the tests"):

- ``CELERY_GPU_TEST_REDIS``: the Redis server, ``redis://host:port`` (default ``redis://127.0.0.1:6379``);
- ``CELERY_GPU_TEST_REDIS_DB_OFFSET``: added to every database number the suite uses (5 to 15 by default), for a
  server whose low databases hold other data (the server needs ``databases`` above 15 plus the offset);
- ``CELERY_GPU_TEST_AMQP``: the RabbitMQ URL, vhost included (default ``amqp://guest:guest@127.0.0.1:5672//``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

_REDIS = urlsplit(os.environ.get("CELERY_GPU_TEST_REDIS", "redis://127.0.0.1:6379"))
REDIS_HOST, REDIS_PORT = _REDIS.hostname or "127.0.0.1", _REDIS.port or 6379
REDIS_DB_OFFSET = int(os.environ.get("CELERY_GPU_TEST_REDIS_DB_OFFSET", "0"))
AMQP_URL = os.environ.get("CELERY_GPU_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
_AMQP = urlsplit(AMQP_URL)
RABBIT_HOST, RABBIT_PORT = _AMQP.hostname or "127.0.0.1", _AMQP.port or 5672


def redis_db(db: int) -> int:
    """The real database number of the suite's database ``db`` (the offset applied)."""
    return db + REDIS_DB_OFFSET


def redis_url(db: int) -> str:
    """``redis://`` URL of the suite's database ``db`` on the test Redis server."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db(db)}"


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
    redis_backend = redis_url(db + 1)
    if name == "redis":
        return Broker(name, redis_url(db), redis_backend)
    require(RABBIT_HOST, RABBIT_PORT, "RabbitMQ")
    return Broker(name, AMQP_URL, redis_backend)
