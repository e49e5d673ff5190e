"""Batching parts on their own: the batch call and its bisection, the waiting queues, buffered result writes
(on the embedded Redis) and acks in bulk (on a real kombu Redis channel)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import Retry, SoftTimeLimitExceeded

from celery_gpu import GPU, BatchArgumentError, BatchResultMismatch, RetryItem
from celery_gpu import batch as batchmod
from celery_gpu.acks import AckBuffer
from celery_gpu.batch import BatchOptions, call_batch, item_of, resolve
from celery_gpu.batcher import Batch, Batcher
from celery_gpu.bulkstore import BulkStore
from celery_gpu.slots import Job


@pytest.fixture()
def gpu_app() -> tuple[Celery, GPU]:
    app = Celery(f"unit-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.task_always_eager = False
    return app, GPU(app, devices="fake:1")


def make_task(gpu: GPU, fn: Any, **options: Any) -> Any:
    return gpu.task(name=f"t.{uuid.uuid4().hex[:8]}", batch=8, **options)(fn)


# -- the batch call ------------------------------------------------------------------------------------------


def test_one_call_for_the_whole_list(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[int]] = []

    def double(items: list[int], k: int = 2) -> list[int]:
        seen.append(list(items))
        return [k * x for x in items]

    task = make_task(gpu_app[1], double)
    assert call_batch(task, [1, 2, 3], {"k": 3}) == [3, 6, 9]
    assert seen == [[1, 2, 3]]


def test_a_failing_call_is_bisected_to_the_bad_items_within_2n_minus_1_calls(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[str]] = []

    def picky(items: list[str]) -> list[str]:
        seen.append(list(items))
        if any(x.startswith("bad") for x in items):
            raise ValueError("bad in batch")
        return [x.upper() for x in items]

    task = make_task(gpu_app[1], picky)
    items = ["a", "b", "bad1", "c", "d", "e", "bad2", "f"]
    before = batchmod.calls[0]
    out = call_batch(task, items, {})
    assert [o if isinstance(o, str) else type(o).__name__ for o in out] == [
        "A", "B", "ValueError", "C", "D", "E", "ValueError", "F"]
    assert len(seen) <= 2 * len(items) - 1
    assert batchmod.calls[0] - before == len(seen)
    assert ["bad1"] in seen and ["bad2"] in seen


def test_every_item_failing_costs_at_most_2n_minus_1_calls(gpu_app: tuple[Celery, GPU]) -> None:
    count = [0]

    def broken(items: list[int]) -> list[int]:
        count[0] += 1
        raise RuntimeError("always")

    out = call_batch(make_task(gpu_app[1], broken), list(range(7)), {})
    assert all(isinstance(o, RuntimeError) for o in out) and len(out) == 7
    assert count[0] == 2 * 7 - 1


def test_wrong_length_fails_every_item_with_batch_result_mismatch(gpu_app: tuple[Celery, GPU]) -> None:
    def short(items: list[int]) -> list[int]:
        return items + [0]

    task = make_task(gpu_app[1], short)
    out = call_batch(task, [1, 2], {})
    assert all(isinstance(o, BatchResultMismatch) for o in out)
    assert "returned 3 results for 2 items" in str(out[0])


def test_soft_time_limit_is_not_split(gpu_app: tuple[Celery, GPU]) -> None:
    count = [0]

    def slow(items: list[int]) -> list[int]:
        count[0] += 1
        raise SoftTimeLimitExceeded()

    out = call_batch(make_task(gpu_app[1], slow), [1, 2, 3, 4], {})
    assert count[0] == 1 and all(isinstance(o, SoftTimeLimitExceeded) for o in out)


def test_per_item_exceptions_and_retries_pass_through(gpu_app: tuple[Celery, GPU]) -> None:
    retry = RetryItem(countdown=1)

    def mixed(items: list[int]) -> list[Any]:
        return [ValueError("x"), retry, 3]

    task = make_task(gpu_app[1], mixed)
    out = call_batch(task, [1, 2, 3], {})
    assert isinstance(out[0], ValueError) and out[1] is retry and out[2] == 3
    with pytest.raises(ValueError):
        resolve(task, out[0])
    assert resolve(task, 3) == 3


def test_retry_item_becomes_a_celery_retry(gpu_app: tuple[Celery, GPU]) -> None:
    def same(items: list[int]) -> list[int]:
        return items

    task = make_task(gpu_app[1], same, max_retries=3)
    task.push_request(id="abc", retries=0, called_directly=False, delivery_info={}, is_eager=True)
    try:
        with pytest.raises(Retry):
            resolve(task, RetryItem(exc=KeyError("k"), countdown=0.5))
    finally:
        task.pop_request()


def test_one_item_per_call() -> None:
    assert item_of("t", [5]) == 5
    with pytest.raises(BatchArgumentError, match="exactly one positional argument"):
        item_of("t", [1, 2])
    with pytest.raises(BatchArgumentError):
        item_of("t", [])


@pytest.mark.parametrize("size,wait", [(0, 0.005), (-1, 0.0), (4, -0.001)])
def test_batch_options_are_checked(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        BatchOptions(size, wait, lambda items: items, False)


def test_outside_a_worker_the_function_gets_a_one_item_list(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [2 * x for x in items]

    task = make_task(gpu_app[1], double)
    assert task(4) == 8
    assert task.apply(args=(5,)).get() == 10
    assert seen == [[4], [5]]
    assert task.gpu_batch.size == 8


def test_bound_batched_task_sees_each_items_request(gpu_app: tuple[Celery, GPU]) -> None:
    got: list[Any] = []

    def bound(self: Any, items: list[int]) -> list[int]:
        got.append([r["id"] for r in self.request.batch])
        return items

    task = gpu_app[1].task(name="t.bound", batch=4, bind=True)(bound)
    assert call_batch(task, [1, 2], {}, [{"id": "a"}, {"id": "b"}]) == [1, 2]
    assert got == [["a", "b"]]


# -- waiting queues and batches ------------------------------------------------------------------------------


_seq = iter(range(1, 1 << 30))


def job(name: str = "t", memory: int = 0, soft: float | None = None, hard: float | None = None) -> Job:
    args = (name, uuid.uuid4().hex, {}, b"[]", "application/json", "utf-8")
    return Job(next(_seq), args, memory, None, None, None, None, soft, hard)


def test_batcher_is_fifo_per_task_and_puts_back_in_order() -> None:
    b = Batcher()
    a = [job("a") for _ in range(5)]
    for j in a:
        b.add(j)
    b.add(x := job("x"))
    assert b.waiting() == {"a": 5, "x": 1} and len(b) == 6
    assert [(n, h) for n, h, _ in b.heads()] == [("a", a[0]), ("x", x)]
    taken = b.take("a", 3)
    assert taken == a[:3]
    b.put_back(taken[1:])
    assert list(b.queues["a"]) == [a[1], a[2], a[3], a[4]]
    assert b.remove_if(lambda j: j is a[3]) == [a[3]]
    assert b.take("a", 10) == [a[1], a[2], a[4]] and b.waiting() == {"x": 1}


def test_a_batch_takes_its_items_largest_memory_and_limits() -> None:
    jobs = [job(memory=1, soft=2.0, hard=5.0), job(memory=3), job(memory=2, soft=4.0, hard=None)]
    batch = Batch(7, jobs)
    assert batch.memory == 3 and batch.soft == 4.0 and batch.hard == 5.0
    frame = batch.frame()
    assert frame["t"] == "batch" and frame["job"] == 7 and len(frame["items"]) == 3
    assert batch.terminated is None
    jobs[0].terminated = signal.SIGTERM
    assert batch.terminated is None, "one item revoked: the call goes on for the others"
    batch.terminate(signal.SIGKILL)
    assert batch.terminated == signal.SIGKILL


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
    with BulkStore(backend) as store:
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
    with BulkStore(backend):
        backend.store_result(done, "duplicate", states.FAILURE)
        backend.store_result(other, "x", states.SUCCESS)
    assert redis_app.AsyncResult(done).result == "first"
    assert redis_app.AsyncResult(other).result == "x"


def test_bulk_store_direct_writes_at_once_keeping_order(redis_app: Celery) -> None:
    backend = redis_app.backend
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    with BulkStore(backend) as store:
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
    with BulkStore(app.backend) as store:
        assert not store.enabled
        app.backend.store_result(tid, 5, states.SUCCESS)
        assert app.AsyncResult(tid).result == 5


# -- acks in bulk --------------------------------------------------------------------------------------------


class FakeMessage:
    def __init__(self) -> None:
        self.acknowledged = False
        self.channel = object()
        self.acks = 0

    def ack_log_error(self, log: Any, errors: Any) -> None:
        self.acks += 1
        self.acknowledged = True


def test_acks_of_one_turn_are_flushed_once() -> None:
    scheduled: list[Any] = []
    buf = AckBuffer(scheduled.append)
    messages = [FakeMessage() for _ in range(4)]
    for m in messages:
        buf.ack(m)()
    assert len(scheduled) == 1 and not any(m.acks for m in messages), "nothing acked before the flush"
    scheduled.pop()()
    assert [m.acks for m in messages] == [1, 1, 1, 1] and buf.flushes == 1 and buf.acked == 4
    buf.ack(messages[0])()
    scheduled.pop()()
    assert messages[0].acks == 1, "an acknowledged message is not acked twice"


def test_acks_on_redis_leave_the_unacked_index_in_one_pipeline(embedded_url: str) -> None:
    from kombu import Connection

    queue = f"acks-{uuid.uuid4().hex[:8]}"
    with Connection(embedded_url) as conn:
        simple = conn.SimpleQueue(queue)
        for i in range(6):
            simple.put({"i": i})
        messages = [simple.get(timeout=5) for _ in range(6)]
        channel = messages[0].channel
        client = channel.client
        assert client.hlen(channel.unacked_key) >= 6
        scheduled: list[Any] = []
        buf = AckBuffer(scheduled.append)
        for m in messages:
            buf.ack(m)()
        scheduled.pop()()
        tags = [m.delivery_tag for m in messages]
        assert not any(client.hexists(channel.unacked_key, t) for t in tags)
        assert all(m.acknowledged for m in messages) and buf.acked == 6
        qos = channel.qos  # kombu forgets acked tags lazily: acked means marked dirty, or gone
        assert all(t in qos._dirty or t not in qos._delivered for t in tags)
        simple.close()


# -- the result set of submit_many ---------------------------------------------------------------------------


def test_submit_many_results_listen_without_sleeping_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's ResultSet reads the results once and sleeps ``interval`` (0.5 s) before it listens; ours not."""
    from celery_gpu.submit import ItemResults

    app = Celery("r", backend="cache+memory://", set_as_current=False)
    seen: list[Any] = []

    def get_many(ids: Any, **kw: Any) -> Any:
        seen.append((set(ids), kw["interval"], kw["max_iterations"]))
        return iter(())

    monkeypatch.setattr(app.backend, "get_many", get_many)
    results = ItemResults([app.AsyncResult("a")], app=app)
    list(results._iter_meta(interval=0.5))
    assert seen == [({"a"}, 0, 1)]


def test_submit_many_sends_one_task_per_item(gpu_app: tuple[Celery, GPU]) -> None:
    from celery_gpu.submit import ItemResults

    app, gpu = gpu_app
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"

    def double(items: list[int]) -> list[int]:
        return [2 * x for x in items]

    task = make_task(gpu, double)
    results = task.submit_many(range(5), chunk=2)
    assert isinstance(results, ItemResults) and len(results.results) == 5
    assert len({r.id for r in results.results}) == 5
    with pytest.raises(TypeError):  # Celery checks the call against the user's function
        task.submit_many([1], kwargs={"nope": 1})


def test_gpu_tasks_send_arrays_with_the_arrays_serializer_and_a_short_argsrepr(gpu_app: tuple[Celery, GPU]) -> None:
    import numpy as np

    from celery_gpu import arrays

    app, gpu = gpu_app
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"
    sent: list[dict[str, Any]] = []

    @gpu.task(name="t.embed")
    def embed(x: Any, scale: float = 1.0) -> float:
        return 0.0

    @gpu.task(name="t.json", serializer="json")
    def as_json(x: Any) -> float:
        return 0.0

    from celery.app.task import Task

    original = Task.apply_async
    Task.apply_async = lambda self, args=None, kwargs=None, **options: sent.append(  # type: ignore[method-assign]
        {"args": args, "kwargs": kwargs, **options})
    try:
        embed.apply_async((np.zeros((2, 3), dtype="f4"),), {"scale": 2.0})
        embed.apply_async(([1.0, 2.0],))
        as_json.apply_async(([1.0],))
    finally:
        Task.apply_async = original  # type: ignore[method-assign]
    assert sent[0]["serializer"] == arrays.NAME
    assert sent[0]["argsrepr"] == "(<ndarray shape=(2, 3) dtype=float32>,)"
    assert "kwargsrepr" not in sent[0], "no array among the kwargs: Celery's own repr"
    assert sent[1]["serializer"] == arrays.NAME and "argsrepr" not in sent[1]
    assert "serializer" not in sent[2], "a task declared with a serializer keeps it"


def test_an_explicit_task_serializer_is_respected() -> None:
    from celery_gpu.submit import _configured

    fresh = Celery("fresh", set_as_current=False)
    assert not _configured(fresh, "task_serializer")
    fresh.conf.task_serializer = "msgpack"
    assert _configured(fresh, "task_serializer")
