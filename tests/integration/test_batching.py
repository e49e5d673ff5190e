"""Batched tasks on a real worker (``tests.apps.batched``, two fake devices), on the embedded Redis, Redis and
RabbitMQ: batch boundaries, each item a whole Celery task, bisection, retries, revoke, acks, sharing.

Every call of a batch function is logged by the app (``TEST_BATCH_LOG``, one JSON line per call), so the tests
assert on the calls the worker really made. ``double`` holds items for ``max_wait_ms=1500`` while another device
process is busy: long enough that "held" and "flushed at once" cannot be confused on a loaded machine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_gpu import GPU
from tests.brokers import Broker, make
from tests.worker import Worker, wait_until, watch_events

pytestmark = pytest.mark.broker
T = "tests.apps.batched."
MAX_WAIT = 1.5  # seconds: TEST_MAX_WAIT_MS of the worker, the max_wait of ``double``


@pytest.fixture(scope="module", params=["embedded", "redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, embedded_url: str) -> Broker:
    return make(request.param, embedded_url)


@pytest.fixture(scope="module")
def worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("batched")
    w = Worker(broker, tmp, devices="fake:2", app_module="tests.apps.batched", args=("-E",),
               extra_env={"TEST_BATCH_LOG": str(tmp / "calls.jsonl"), "TEST_MAX_WAIT_MS": str(MAX_WAIT * 1000)})
    w.start()
    w.wait_ready()
    yield w
    assert w.stop() == 0, w.log()


def client_task(w: Worker, name: str, batch: int = 16) -> Any:
    """The batched task ``name`` as a client sees it (for ``submit_many``), on the worker's broker and queue."""
    if T + name in w.app.tasks:
        return w.app.tasks[T + name]
    gpu = GPU.of(w.app) or GPU(w.app)

    def stub(items: list[Any]) -> list[Any]:
        raise AssertionError("runs only in the worker")

    return gpu.task(name=T + name, batch=batch)(stub)


def calls(w: Worker, task: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
    """The logged calls of batch functions (of ``task``), made after ``since`` (a ``time.time()``)."""
    path = Path(w.env["TEST_BATCH_LOG"])
    lines = path.read_text().splitlines() if path.exists() else []
    found = [json.loads(line) for line in lines]
    return [c for c in found if (task is None or c["task"] == task) and c["t"] >= since]


def pool(w: Worker) -> dict[str, Any]:
    stats = w.pool_stats()
    assert stats is not None, w.log()
    return stats


def busy_slots(w: Worker) -> int:
    return sum(s["state"] == "busy" for d in pool(w)["devices"] for s in d["slots"])


def wait_idle(w: Worker) -> None:
    assert wait_until(lambda: busy_slots(w) == 0 and not any(
        v["waiting"] for v in pool(w).get("batching", {}).values()), 30), w.log()


def occupy(w: Worker, seconds: float, slots: int = 2) -> list[Any]:
    """Keep ``slots`` device processes busy with an unbatched ``nap``; returns once they are busy."""
    wait_idle(w)
    naps = [w.app.send_task(T + "nap", args=[seconds]) for _ in range(slots)]
    assert wait_until(lambda: busy_slots(w) == slots, 20, 0.05), w.log()
    return naps


def waiting(w: Worker, name: str) -> int:
    return int(pool(w).get("batching", {}).get(T + name, {}).get("waiting", 0))


def test_idle_worker_flushes_a_single_item_at_once(worker: Worker) -> None:
    wait_idle(worker)
    since = time.time()
    result = worker.app.send_task(T + "double", args=[21])
    assert result.get(timeout=30) == 42
    took = time.time() - since
    [call] = calls(worker, "double", since)
    assert call["n"] == 1 and call["items"] == [21]
    assert took < MAX_WAIT, f"an idle worker must not hold an item for max_wait ({took:.2f}s)"


def test_items_are_held_while_busy_until_max_wait(worker: Worker) -> None:
    naps = occupy(worker, 6.0, slots=1)  # one process busy, the other idle
    since = time.time()
    results = [worker.app.send_task(T + "double", args=[i]) for i in range(3)]
    assert [r.get(timeout=30) for r in results] == [0, 2, 4]
    [call] = calls(worker, "double", since)
    assert call["n"] == 3, "three items held together, not flushed one by one"
    held = call["t"] - since
    assert held >= MAX_WAIT * 0.9, f"flushed after {held:.2f}s, before max_wait"
    assert not naps[0].ready(), "the batch must not have waited for the busy process to finish"
    naps[0].get(timeout=30)


def test_batch_size_bounds_every_call(worker: Worker) -> None:
    naps = occupy(worker, 4.0, slots=1)
    since = time.time()
    results = client_task(worker, "double").submit_many(range(40))
    assert results.get(timeout=60) == [2 * i for i in range(40)]
    sizes = [c["n"] for c in calls(worker, "double", since)]
    assert sum(sizes) == 40 and max(sizes) == 16, sizes
    assert sizes[0] == 16, "a full batch goes at once although the other process is busy"
    assert sorted(i for c in calls(worker, "double", since) for i in c["items"]) == list(range(40))
    naps[0].get(timeout=30)


def test_each_item_is_its_own_task_with_result_and_events(worker: Worker) -> None:
    seen = watch_events(worker.app)
    naps = occupy(worker, 2.0)
    since = time.time()
    results = client_task(worker, "double").submit_many([5, 6, 7, 8])
    assert results.get(timeout=30) == [10, 12, 14, 16]
    assert [c["n"] for c in calls(worker, "double", since)] == [4], "one call for the four items"
    ids = [r.id for r in results.results]
    assert len(set(ids)) == 4
    for r, expected in zip(results.results, [10, 12, 14, 16], strict=True):
        fresh = worker.client().AsyncResult(r.id)  # read back from the backend, not the client's cache
        assert fresh.state == "SUCCESS" and fresh.result == expected
        assert wait_until(lambda r=r: "task-succeeded" in seen.get(r.id, []), 15), seen.get(r.id)
        assert {"task-received", "task-started", "task-succeeded"} <= set(seen[r.id])
    for n in naps:
        n.get(timeout=30)


def test_wrong_length_return_fails_its_items_by_name(worker: Worker) -> None:
    naps = occupy(worker, 1.5)
    results = client_task(worker, "short", batch=8).submit_many([1, 2, 3])
    for r in results.results:
        with pytest.raises(Exception) as info:
            r.get(timeout=30)
        assert type(info.value).__name__ == "BatchResultMismatch"
        assert "returned 2 results for 3 items" in str(info.value)
    for n in naps:
        n.get(timeout=30)


def test_a_failing_batch_is_bisected_good_items_succeed(worker: Worker) -> None:
    naps = occupy(worker, 1.5)
    since = time.time()
    items = ["a", "b", "c", "bad", "d", "e", "f"]
    results = client_task(worker, "picky", batch=8).submit_many(items)
    for item, r in zip(items, results.results, strict=True):
        if item == "bad":
            with pytest.raises(ValueError, match="bad item"):
                r.get(timeout=30)
        else:
            assert r.get(timeout=30) == f"ok:{item}"
    made = calls(worker, "picky", since)
    assert made[0]["n"] == 7, "the seven items were first called as one batch"
    assert len(made) <= 2 * 7 - 1, f"bisection is bounded: {len(made)} calls"
    assert [c["items"] for c in made if c["n"] == 1 and c["items"] == ["bad"]], "the bad item was isolated"
    assert pool(worker)["batching"][T + "picky"]["calls"] >= len(made)
    for n in naps:
        n.get(timeout=30)


def test_per_item_exceptions_returned_in_place(worker: Worker) -> None:
    results = client_task(worker, "mixed", batch=8).submit_many([1, 2, 3, 4])
    outcomes = []
    for r in results.results:
        try:
            outcomes.append(r.get(timeout=30))
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes == ["odd 1", 2, "odd 3", 4]
    assert [r.state for r in results.results] == ["FAILURE", "SUCCESS", "FAILURE", "SUCCESS"]


def test_retries_are_per_item(worker: Worker) -> None:
    since = time.time()
    results = client_task(worker, "retry_odd", batch=8).submit_many([1, 2, 3, 4])
    assert [tuple(r.get(timeout=60)) for r in results.results] == [(1, 2), (2, 0), (3, 2), (4, 0)]
    made = calls(worker, "retry_odd", since)
    called = [i for c in made for i in c["items"]]
    assert called.count(2) == 1 and called.count(4) == 1, "even items ran once"
    assert called.count(1) == 3 and called.count(3) == 3, "odd items ran once and were retried twice"
    assert sorted(n for c in made for x, n in zip(c["items"], c["retries"], strict=True) if x == 1) == [0, 1, 2]


def test_autoretry_for_retries_the_failing_item_only(worker: Worker) -> None:
    since = time.time()
    results = client_task(worker, "auto", batch=8).submit_many([12, 13, 14])
    assert results.results[0].get(timeout=60) == 12
    assert results.results[2].get(timeout=60) == 14
    with pytest.raises(KeyError):
        results.results[1].get(timeout=60)
    called = [i for c in calls(worker, "auto", since) for i in c["items"]]
    assert called.count(13) == 3, "the first call and max_retries=2 retries"
    assert called.count(12) == 1 and called.count(14) == 1


def test_revoked_item_in_a_waiting_batch_is_never_called(worker: Worker) -> None:
    naps = occupy(worker, 3.0)
    since = time.time()
    results = client_task(worker, "double").submit_many([1, 2, 3, 4, 5])
    assert wait_until(lambda: waiting(worker, "double") == 5, 15), pool(worker).get("batching")
    victim = results.results[2]
    worker.app.control.revoke(victim.id)
    for i, r in enumerate(results.results):
        if r is victim:
            continue
        assert r.get(timeout=30) == 2 * (i + 1)
    assert wait_until(lambda: victim.state == "REVOKED", 15), victim.state
    called = [i for c in calls(worker, "double", since) for i in c["items"]]
    assert sorted(called) == [1, 2, 4, 5], called
    for n in naps:
        n.get(timeout=30)


def test_two_batched_tasks_share_the_devices_fairly(worker: Worker) -> None:
    naps = occupy(worker, 2.0)
    since = time.time()
    results = []
    for i in range(32):  # interleaved: double, square, double, square...
        results.append(worker.app.send_task(T + "double", args=[i]))
        results.append(worker.app.send_task(T + "square", args=[i]))
    assert wait_until(lambda: waiting(worker, "double") + waiting(worker, "square") == 64, 15), (
        pool(worker).get("batching"), worker.pool_stats())
    plain = worker.app.send_task(T + "plain", args=[41])
    assert [r.get(timeout=60) for r in results] == [v for i in range(32) for v in (2 * i, i * i)]
    assert plain.get(timeout=30) == 42
    made = sorted(calls(worker, None, since), key=lambda c: c["t"])
    order = [c["task"] for c in made if c["task"] in ("double", "square")]
    assert sorted(order[:2]) == ["double", "square"], f"the oldest waiting work goes first, by task: {order}"
    assert all(c["n"] == 16 for c in made), [c["n"] for c in made]
    batching = pool(worker)["batching"]
    for name in ("double", "square"):
        assert batching[T + name]["items"] >= 32 and batching[T + name]["mean_batch"] > 1
    for n in naps:
        n.get(timeout=30)


def test_a_call_with_two_positional_arguments_fails_by_name(worker: Worker) -> None:
    with pytest.raises(Exception) as info:
        worker.app.send_task(T + "double", args=[1, 2]).get(timeout=30)
    assert type(info.value).__name__ == "BatchArgumentError"
    assert worker.app.send_task(T + "double", args=[3]).get(timeout=30) == 6


def test_kwargs_split_a_batch_into_calls_of_equal_kwargs(worker: Worker) -> None:
    naps = occupy(worker, 1.5)
    since = time.time()
    a = [worker.app.send_task(T + "double", args=[i]) for i in range(3)]
    b = [worker.app.send_task(T + "double", args=[i], kwargs={"pause": 0.01}) for i in range(3, 5)]
    assert [r.get(timeout=30) for r in a + b] == [0, 2, 4, 6, 8]
    made = calls(worker, "double", since)
    assert sorted((c["pause"], c["items"]) for c in made) == [(0.0, [0, 1, 2]), (0.01, [3, 4])]
    for n in naps:
        n.get(timeout=30)


# -- acks: only after the results are stored ---------------------------------------------------------------------


def _snapshot(r: Any, ids: list[str]) -> tuple[set[str], set[str]]:
    """One atomic view of a Redis used as broker and backend: ids still unacked, ids with a stored result."""
    with r.pipeline(transaction=True) as p:
        p.hvals("unacked")
        for i in ids:
            p.exists(f"celery-task-meta-{i}")
        out = p.execute()
    unacked = {json.loads(v)[0]["headers"]["id"] for v in out[0]} & set(ids)
    return unacked, {i for i, e in zip(ids, out[1:], strict=True) if e}


@pytest.mark.parametrize("where", ["embedded", "redis"])
def test_acks_come_only_after_results_are_stored(where: str, embedded_url: str, tmp_path: Path) -> None:
    import redis

    url = embedded_url if where == "embedded" else make("redis", embedded_url, db=13).broker_url
    b = Broker(where, url, url)  # broker and backend in one Redis database: one atomic view of both
    w = Worker(b, tmp_path, devices="fake:2", app_module="tests.apps.batched",
               extra_env={"TEST_BATCH_LOG": str(tmp_path / "calls.jsonl")}).start()
    try:
        w.wait_ready()
        r = redis.Redis.from_url(url.replace("redis+socket://", "unix://"))
        violations: list[str] = []
        seen_unacked: set[str] = set()
        ids = [str(uuid.uuid4()) for _ in range(48)]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                unacked, stored = _snapshot(r, ids)
                for i in seen_unacked - unacked - stored:
                    violations.append(i)  # acknowledged while its result was not in the backend
                seen_unacked.update(unacked)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results = [w.app.send_task(T + "double", args=[i], kwargs={"pause": 0.2}, task_id=ids[i]) for i in range(48)]
        assert [x.get(timeout=60) for x in results] == [2 * i for i in range(48)]
        assert wait_until(lambda: not (_snapshot(r, ids)[0] & set(ids)), 15), "acks must follow the results"
        stop.set()
        watcher.join(10)
        assert seen_unacked, "the watcher must have seen messages in flight"
        assert not violations, f"acknowledged before the result was stored: {violations[:5]}"
        assert max(c["n"] for c in calls(w)) > 1, "the items were batched"
    finally:
        assert w.stop() == 0, w.log()


def test_killed_worker_redelivers_a_running_batch(embedded_url: str, tmp_path: Path) -> None:
    """RabbitMQ under acks_late: a worker killed in the middle of a batch call has acked none of its items;
    they are delivered again to the next worker and all succeed."""
    b = make("rabbitmq", embedded_url)
    log = tmp_path / "calls.jsonl"
    env = {"TEST_BATCH_LOG": str(log)}
    w = Worker(b, tmp_path, devices="fake:1", app_module="tests.apps.batched", extra_env=env).start()
    w.wait_ready()
    results = [w.app.send_task(T + "double", args=[i], kwargs={"pause": 4}) for i in range(5)]
    assert wait_until(lambda: bool(calls(w, "double")), 30), w.log()
    assert w.proc is not None
    first = calls(w, "double")[0]["items"]
    os.kill(w.proc.pid, signal.SIGKILL)  # the main process; its device process follows (PDEATHSIG)
    w.proc.wait(10)
    killed_at = time.time()
    assert not any(x.ready() for x in results)
    w2 = Worker(b, tmp_path, devices="fake:1", app_module="tests.apps.batched", extra_env=env)
    w2.queue, w2.name = w.queue, f"{w.queue}-2@test"
    w2.env["TEST_QUEUE"] = w.queue
    w2.start()
    try:
        assert [x.get(timeout=60) for x in results] == [0, 2, 4, 6, 8]
        again = sorted(i for c in calls(w2, "double", killed_at) for i in c["items"])
        assert again == [0, 1, 2, 3, 4], "every item ran again in the new worker, once"
        assert first and set(first) <= set(again), "the items of the interrupted call were not acked"
    finally:
        assert w2.stop(timeout=60) == 0, w2.log()
