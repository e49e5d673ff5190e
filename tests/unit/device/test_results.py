"""A batch's result writes, buffered and written in one round trip (on the embedded Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, states

from celery_gpu.device.results import BatchResults

# -- buffered result writes ----------------------------------------------------------------------------------


@pytest.fixture()
def redis_app(embedded_url: str) -> Iterator[Celery]:
    app = Celery("bulk", broker=embedded_url, backend=embedded_url, set_as_current=False)
    app.conf.result_expires = 600
    yield app
    app.close()


def test_bulk_store_writes_a_batch_in_two_round_trips(redis_app: Celery) -> None:
    backend = redis_app.backend
    ids = [uuid.uuid4().hex for _ in range(5)]
    with BatchResults(backend) as store:
        assert store.enabled
        for i, tid in enumerate(ids):
            backend.store_result(tid, i * 10, states.SUCCESS)
        assert all(backend.client.get(backend.get_key_for_task(t)) is None for t in ids), "buffered until flush"
    assert store.writes == 2
    assert [redis_app.AsyncResult(t).result for t in ids] == [0, 10, 20, 30, 40]
    ttl = backend.client.ttl(backend.get_key_for_task(ids[0]))
    assert 0 < ttl <= 600


def test_bulk_store_never_overwrites_a_stored_success(redis_app: Celery) -> None:
    backend = redis_app.backend
    done, other = uuid.uuid4().hex, uuid.uuid4().hex
    backend.store_result(done, "first", states.SUCCESS)
    with BatchResults(backend):
        backend.store_result(done, "duplicate", states.FAILURE)
        backend.store_result(other, "x", states.SUCCESS)
    assert redis_app.AsyncResult(done).result == "first"
    assert redis_app.AsyncResult(other).result == "x"


def test_bulk_store_direct_writes_at_once_keeping_order(redis_app: Celery) -> None:
    backend = redis_app.backend
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    with BatchResults(backend) as store:
        backend.store_result(a, 1, states.SUCCESS)
        with store.direct():
            assert redis_app.AsyncResult(a).result == 1, "what was buffered is written first"
            backend.store_result(b, 2, states.SUCCESS)
            assert redis_app.AsyncResult(b).result == 2
        assert not store.pending
    assert "_store_result" not in vars(backend), "the backend's own method is back"


def test_bulk_store_leaves_other_backends_alone() -> None:
    app = Celery("cache", backend="cache+memory://", set_as_current=False)
    tid = uuid.uuid4().hex
    with BatchResults(app.backend) as store:
        assert not store.enabled
        app.backend.store_result(tid, 5, states.SUCCESS)
        assert app.AsyncResult(tid).result == 5
