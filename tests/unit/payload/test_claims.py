"""Claim check: payloads above the threshold go to a store (the app's Redis, or a private directory when configured),
the message carries a reference; the stored payload is checked on the way back, expires, and is deleted once
consumed."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from celery import Celery

from celery_gpu.payload import claims as claimcheck
from celery_gpu.payload.claims import (
    MAGIC,
    ClaimCorrupt,
    ClaimMissing,
    FileStore,
    RedisStore,
    Store,
    is_reference,
    redis_store_for_app,
    unwrap,
    wrap,
)
from tests.brokers import REDIS_HOST, REDIS_PORT, redis_db, redis_url, require

UNKNOWN = "0123456789abcdef0123456789abcdef"


def _cleanup(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


@pytest.fixture()
def machine_redis() -> Iterator[Any]:
    """The test Redis, the suite's db 13 (skips without it, fails under CI=true)."""
    require(REDIS_HOST, REDIS_PORT, "Redis")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db(13))
    yield client
    client.close()


@pytest.fixture()
def embedded_redis(embedded_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(embedded_url.replace("redis+socket://", "unix://"))
    yield client
    client.close()


def _redis_store(client: Any) -> Iterator[RedisStore]:
    store = RedisStore(client, prefix=f"celery-gpu-claim-test-{uuid.uuid4().hex[:8]}:")
    yield store
    _cleanup(client, store.prefix)


@pytest.fixture(params=["redis", "embedded", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "file":
        yield FileStore(tmp_path / "claims")
    else:
        yield from _redis_store(request.getfixturevalue("machine_redis" if request.param == "redis" else
                                                        "embedded_redis"))


@pytest.fixture()
def redis_store(machine_redis: Any) -> Iterator[RedisStore]:
    yield from _redis_store(machine_redis)


@pytest.fixture()
def embedded_store(embedded_redis: Any) -> Iterator[RedisStore]:
    yield from _redis_store(embedded_redis)


def reference(key: str, size: int, sha256: str) -> bytes:
    packed: bytes = msgpack.packb({"key": key, "size": size, "sha256": sha256})
    return MAGIC + packed


# -- every store ---------------------------------------------------------------------------------------------------


def test_round_trip(store: Store) -> None:
    payload = os.urandom(5000)
    ref = wrap(payload, store, threshold=1000, ttl=60)
    assert is_reference(ref) and len(ref) < 200
    assert unwrap(ref, store) == payload
    assert unwrap(ref, store) == payload  # not deleted unless asked


def test_below_threshold_passes_through_unchanged(store: Store) -> None:
    payload = b"small"
    assert wrap(payload, store, threshold=6, ttl=60) is payload
    assert unwrap(payload, store) is payload
    assert is_reference(wrap(payload, store, threshold=5, ttl=60))  # the threshold itself is stored


def test_payload_that_looks_like_a_reference_is_always_stored(store: Store) -> None:
    payload = MAGIC + b"not a reference"
    ref = wrap(payload, store, threshold=1 << 20, ttl=60)
    assert ref != payload
    assert unwrap(ref, store) == payload


def test_unwrap_with_delete_removes_the_payload(store: Store) -> None:
    ref = wrap(b"x" * 100, store, threshold=10, ttl=60)
    key = msgpack.unpackb(ref[len(MAGIC):])["key"]
    assert unwrap(ref, store, delete=True) == b"x" * 100
    with pytest.raises(ClaimMissing):
        store.get(key)
    with pytest.raises(ClaimMissing):
        unwrap(ref, store)


def test_delete_is_idempotent(store: Store) -> None:
    key = store.put(b"data", 60)
    store.delete(key)
    store.delete(key)
    with pytest.raises(ClaimMissing):
        store.get(key)


def test_unknown_key_is_missing(store: Store) -> None:
    own = store.put(b"data", 60)
    unknown = own[:-32] + UNKNOWN
    with pytest.raises(ClaimMissing):
        store.get(unknown)
    assert issubclass(ClaimMissing, LookupError)


def test_tampered_or_resized_payload_is_corrupt(store: Store) -> None:
    payload = b"a" * 64
    key = store.put(b"b" * 64, 60)  # same size, other content: as if changed where it is stored
    with pytest.raises(ClaimCorrupt, match="SHA-256"):
        unwrap(reference(key, 64, hashlib.sha256(payload).hexdigest()), store)
    with pytest.raises(ClaimCorrupt, match="65"):
        unwrap(reference(key, 65, hashlib.sha256(b"b" * 64).hexdigest()), store)
    assert issubclass(ClaimCorrupt, ValueError)


@pytest.mark.parametrize("data", [MAGIC + b"\xc1garbage", MAGIC + msgpack.packb({"key": 1}),
                                  MAGIC + msgpack.packb({"key": "k", "size": "1", "sha256": "x"}), MAGIC])
def test_malformed_reference_is_corrupt(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(ClaimCorrupt):
        unwrap(data, FileStore(tmp_path / "claims"))


@pytest.mark.parametrize("key", ["../x", "../" + UNKNOWN, "/etc/passwd", UNKNOWN.upper(), UNKNOWN + "0", ""])
def test_foreign_keys_are_refused(key: str, tmp_path: Path, embedded_store: RedisStore) -> None:
    """A forged key is a named decode error (ClaimForged, an ArrayDecodeError: a task fails by name with it)."""
    from celery_gpu.errors import ArrayDecodeError, ClaimForged

    assert issubclass(ClaimForged, ClaimCorrupt) and issubclass(ClaimForged, ArrayDecodeError)
    for store in (FileStore(tmp_path / "claims"), embedded_store):
        with pytest.raises(ClaimForged, match="not a key of this claim store"):
            store.get(key)
        with pytest.raises(ClaimForged):
            store.delete(key)
        with pytest.raises(ClaimForged):
            unwrap(reference(key, 1, "0" * 64), store, delete=True)
    with pytest.raises(ClaimForged):
        embedded_store.get("celery-task-meta-" + UNKNOWN)  # another key of the same Redis


# -- RedisStore ----------------------------------------------------------------------------------------------------


def test_redis_ttl_is_whole_seconds_at_least_one(embedded_store: RedisStore) -> None:
    client = embedded_store.client
    assert client.ttl(embedded_store.put(b"x", 0.2)) == 1
    assert 2000 < client.pttl(embedded_store.put(b"x", 2.5)) <= 3000
    key = embedded_store.put(b"x", 60)
    assert key.startswith(embedded_store.prefix) and len(key) == len(embedded_store.prefix) + 32


def test_redis_payload_expires(redis_store: RedisStore, embedded_store: RedisStore) -> None:
    keys = [(s, s.put(b"soon gone", 1)) for s in (redis_store, embedded_store)]
    time.sleep(1.2)
    for store, key in keys:
        with pytest.raises(ClaimMissing):
            store.get(key)


def test_redis_100_mib_round_trip(redis_store: RedisStore) -> None:
    payload = os.urandom(1 << 20) * 100
    ref = wrap(payload, redis_store, threshold=claimcheck.DEFAULT_THRESHOLD, ttl=60)
    assert unwrap(ref, redis_store, delete=True) == payload
    assert not list(redis_store.client.scan_iter(match=redis_store.prefix + "*"))


def test_redis_chunked_round_trip(embedded_store: RedisStore) -> None:
    embedded_store.chunk_size = 1000
    client = embedded_store.client
    payload = os.urandom(10_500)
    ref = wrap(memoryview(payload), embedded_store, threshold=1, ttl=60)  # type: ignore[arg-type]
    key = msgpack.unpackb(ref[len(MAGIC):])["key"]
    assert client.get(key) is None and client.get(f"{key}:chunks") == b"11"
    assert [len(client.get(f"{key}:{i}")) for i in range(11)] == [1000] * 10 + [500]
    assert all(0 < client.ttl(k) <= 60 for k in client.scan_iter(match=key + "*"))
    assert unwrap(ref, embedded_store) == payload

    client.delete(f"{key}:3")  # one chunk expired first
    with pytest.raises(ClaimMissing):
        unwrap(ref, embedded_store)
    embedded_store.delete(key)
    assert not list(client.scan_iter(match=key + "*"))


def test_redis_store_from_urls(embedded_url: str) -> None:
    path = embedded_url.removeprefix("redis+socket://")
    for url in (embedded_url, f"unix://{path}", f"unix://{path}?db=13", f"redis+socket://{path}?virtual_host=13"):
        store = RedisStore.from_url(url)
        assert store.client.connection_pool.connection_kwargs["path"] == path
        key = store.put(b"via " + url.encode(), 60)
        assert store.get(key) == b"via " + url.encode()
        store.delete(key)
    assert RedisStore.from_url(f"redis+socket://{path}?virtual_host=13").client.connection_pool.connection_kwargs[
        "db"] == 13
    tcp = RedisStore.from_url("redis://127.0.0.1:6379/13").client.connection_pool
    assert (tcp.connection_kwargs["host"], tcp.connection_kwargs["db"]) == ("127.0.0.1", 13)
    assert RedisStore.from_url("rediss://127.0.0.1:6380/0").client.connection_pool.connection_class is (
        redis.SSLConnection)


def test_redis_store_refuses_decoding_client() -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(redis.Redis(decode_responses=True))


# -- FileStore -----------------------------------------------------------------------------------------------------


def test_file_store_permissions(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = FileStore(tmp_path / "claims")
        key = store.put(b"secret", 60)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "claims").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "claims" / key).st_mode) == 0o600
    assert os.listdir(tmp_path / "claims") == [key]  # no temp file left


def test_file_store_refuses_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(PermissionError, match="0700"):
        FileStore(shared)
    (tmp_path / "link").symlink_to(tmp_path / "claims", target_is_directory=True)
    FileStore(tmp_path / "claims")
    with pytest.raises(PermissionError):
        FileStore(tmp_path / "link")


def test_file_store_expiry_and_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    store = FileStore(tmp_path / "claims", clock=clock)
    short, long = store.put(b"short", 10), store.put(b"long", 100)
    (tmp_path / "claims" / ".tmp-dead").write_bytes(b"partial")
    os.utime(tmp_path / "claims" / ".tmp-dead", (now[0], now[0]))
    now[0] += 10
    with pytest.raises(ClaimMissing, match="expired"):
        store.get(short)
    assert not (tmp_path / "claims" / short).exists()  # deleted on the way
    assert store.get(long) == b"long"

    monkeypatch.setattr(store, "clock", lambda: now[0] + 3600)
    assert store.sweep() == 2  # the long one and the dead writer's temp file
    assert os.listdir(tmp_path / "claims") == []


# -- redis_store_for_app -------------------------------------------------------------------------------------------


def test_store_for_app_uses_the_redis_result_backend(make_app: Callable[..., Celery]) -> None:
    app = make_app(broker_url="memory://", result_backend=redis_url(13))
    store = redis_store_for_app(app)
    assert isinstance(store, RedisStore) and store.client is app.backend.client


def test_store_for_app_on_the_embedded_redis(make_app: Callable[..., Celery], embedded_url: str) -> None:
    for conf in ({"broker_url": embedded_url, "result_backend": embedded_url},
                 {"broker_url": embedded_url, "result_backend": "cache+memory://"}):
        store = redis_store_for_app(make_app(**conf))
        assert isinstance(store, RedisStore)
        key = store.put(b"payload", 60)
        assert store.get(key) == b"payload"
        store.delete(key)


def test_an_app_without_redis_has_no_claim_check(make_app: Callable[..., Celery], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Design decision 23: a shared directory is only used when configured explicitly, never as a fallback.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = make_app(broker_url="memory://", result_backend="cache+memory://")
    assert redis_store_for_app(app) is None
    claimcheck.configure_for_app(app)
    assert claimcheck.threshold() is None, "off: payloads stay in the message"
    assert os.listdir(tmp_path) == []
    store = FileStore(tmp_path / "claims")  # the explicit way
    assert unwrap(wrap(b"z" * 10, store, threshold=1, ttl=60), store, delete=True) == b"z" * 10


# -- wired into the arrays serializer ------------------------------------------------------------------------


def test_arrays_payloads_over_the_threshold_go_out_of_band(tmp_path: Path) -> None:
    import numpy as np

    from celery_gpu.payload import arrays
    from celery_gpu.payload import claims as claimcheck

    store = claimcheck.FileStore(tmp_path / "claims")
    claimcheck.configure(lambda: store, threshold=1 << 16, ttl=60)
    try:
        body = ((np.ones(1 << 15, dtype="<f4"),), {}, {"callbacks": None, "chord": None})
        wire = arrays.dumps(body)
        assert claimcheck.is_reference(wire) and len(wire) < 1024, "only a reference travels"
        small = arrays.dumps(((np.ones(4, dtype="<f4"),), {}, {}))
        assert not claimcheck.is_reference(small)
        args, kwargs, embed = arrays.loads(wire)
        assert args[0].shape == (1 << 15,) and embed == {"callbacks": None, "chord": None}
        claimcheck.defer_fetch(True)  # the worker's main process: the skeleton, no fetch
        try:
            assert arrays.loads(wire) == [[], {}, {"callbacks": None, "chord": None}]
        finally:
            claimcheck.defer_fetch(False)
        claimcheck.consumed(wire)
        with pytest.raises(claimcheck.ClaimMissing):
            arrays.loads(wire)
        claimcheck.consumed(b"not a reference")  # nothing to do, no error
    finally:
        claimcheck.configure(None)


def test_the_main_process_refuses_a_reference_without_a_skeleton_and_fetches_nothing(tmp_path: Path) -> None:
    """The worker's main process decodes a reference to its skeleton; one without a skeleton is refused by name
    there, before any fetch (the device process, which fetches, is the only place a payload is read)."""
    from celery_gpu.payload import arrays
    from celery_gpu.payload import claims as claimcheck

    store = claimcheck.FileStore(tmp_path / "claims")
    fetched: list[str] = []
    real_get = store.get
    store.get = lambda key: fetched.append(key) or real_get(key)  # type: ignore[method-assign]
    claimcheck.configure(lambda: store, threshold=16, ttl=60)
    try:
        wire = arrays.dumps({"not": "a task body", "pad": "x" * 64})  # no task body: no skeleton
        assert claimcheck.is_reference(wire) and claimcheck.skeleton_of(wire) is None
        claimcheck.defer_fetch(True)
        try:
            with pytest.raises(ClaimCorrupt, match="without a skeleton"):
                arrays.loads(wire)
        finally:
            claimcheck.defer_fetch(False)
        assert fetched == [], "the main process fetched a payload"
        assert arrays.loads(wire) == {"not": "a task body", "pad": "x" * 64}  # a device process fetches it
        assert len(fetched) == 1
    finally:
        claimcheck.configure(None)


def test_a_reference_without_a_store_is_a_named_decode_error() -> None:
    from celery_gpu.errors import ArrayDecodeError
    from celery_gpu.payload import claims as claimcheck

    claimcheck.configure(None)
    ref = claimcheck.MAGIC + __import__("msgpack").packb({"key": "0" * 32, "size": 1, "sha256": "x"})
    from celery_gpu.payload import arrays

    with pytest.raises(ArrayDecodeError, match="no claim store"):
        arrays.loads(ref)
