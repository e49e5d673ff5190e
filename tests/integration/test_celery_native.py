"""What a Celery user sees of the GPU pool is what a stock prefork worker shows (issue 16): retries from inside a
batched call, the exception and traceback in task events (compared with a real prefork worker on the same
broker, through Celery's own event receiver), a batched item's run time in the log line, the event and the
result, and the items' requests as attributes.

One broker (the test Redis): these are Celery's own callbacks and events, the same on every transport.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from tests.brokers import Broker, make
from tests.integration.test_batching import calls, client_task, occupy, wait_idle
from tests.worker import Worker, record_events, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.batched."


@pytest.fixture(scope="module")
def broker(embedded_url: str) -> Broker:
    return make("redis", embedded_url, db=7)


@pytest.fixture(scope="module")
def worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("native")
    w = Worker(broker, tmp, devices="fake:2", app_module="tests.apps.batched", args=("-E",),
               extra_env={"TEST_BATCH_LOG": str(tmp / "calls.jsonl")})
    w.start()
    w.wait_ready()
    yield w
    assert w.stop() == 0, w.log()


@pytest.fixture(scope="module")
def prefork(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A stock prefork worker (``tests.apps.prefork``: the same task bodies, no celery-gpu) on the same broker."""
    w = Worker(broker, tmp_path_factory.mktemp("prefork"), app_module="tests.apps.prefork",
               args=("-E", "-P", "prefork", "-c", "1")).start()
    assert wait_until(lambda: bool(w.app.control.ping([w.name], timeout=0.5)), 60), w.log()
    yield w
    assert w.stop() == 0, w.log()


def _by_type(events: dict[str, list[dict[str, Any]]], task_id: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for e in events.get(task_id, []):
        found.setdefault(e["type"], []).append(e)
    return found


def _wait_event(events: dict[str, list[dict[str, Any]]], task_id: str, kind: str, timeout: float = 30) -> None:
    assert wait_until(lambda: kind in _by_type(events, task_id), timeout), events.get(task_id)


def _last_line(traceback: str) -> str:
    return traceback.strip().splitlines()[-1]


# -- item 2: events carry the exception and its traceback, as prefork's do -----------------------------------


def test_failure_and_retry_events_carry_what_prefork_events_carry(worker: Worker, prefork: Worker) -> None:
    events = record_events(worker.app, seconds=90)
    ours = {name: worker.app.send_task(T + name, args=[3]) for name in ("boom", "retry_reason")}
    theirs = {name: prefork.app.send_task(T + name, args=[3]) for name in ("boom", "retry_reason")}
    for result in [*ours.values(), *theirs.values()]:
        with pytest.raises(ValueError):
            result.get(timeout=30)
        _wait_event(events, result.id, "task-failed")
    for name in ("boom", "retry_reason"):
        gpu, stock = _by_type(events, ours[name].id), _by_type(events, theirs[name].id)
        assert sorted(gpu) == sorted(stock), (gpu, stock)  # the same kinds of events
        for kind in ("task-failed", "task-retried") if name == "retry_reason" else ("task-failed",):
            [g], [s] = gpu[kind], stock[kind]
            assert g["exception"] == s["exception"], kind
            assert _last_line(g["traceback"]) == _last_line(s["traceback"]), kind
            assert "tests/apps/batched.py" in g["traceback"] and "raise " in g["traceback"]
    assert _by_type(events, ours["boom"].id)["task-failed"][0]["exception"] == \
        "ValueError('Unsupported input type: int')"
    assert _by_type(events, ours["retry_reason"].id)["task-retried"][0]["exception"] == "ValueError('retry me')"


def test_batched_items_failure_events_carry_the_exception(worker: Worker) -> None:
    events = record_events(worker.app, seconds=60)
    picky = client_task(worker, "picky", batch=8).submit_many(["a", "bad", "c"]).results
    mixed = client_task(worker, "mixed", batch=8).submit_many([1, 2]).results
    for result in (picky[1], mixed[0]):
        with pytest.raises(ValueError):
            result.get(timeout=30)
        _wait_event(events, result.id, "task-failed")
    [raised] = _by_type(events, picky[1].id)["task-failed"]  # the call raised: bisected down to this item
    assert raised["exception"] == "ValueError('bad item in the batch')"
    assert 'raise ValueError("bad item in the batch")' in raised["traceback"]
    assert _last_line(raised["traceback"]) == "ValueError: bad item in the batch"
    [returned] = _by_type(events, mixed[0].id)["task-failed"]  # returned in the item's place
    assert returned["exception"] == "ValueError('odd 1')"
    assert _last_line(returned["traceback"]) == "ValueError: odd 1"


# -- item 3: a batched item's run time is its call's ---------------------------------------------------------


def test_a_batched_items_run_time_agrees_in_log_event_and_result(worker: Worker) -> None:
    wait_idle(worker)
    events = record_events(worker.app, seconds=60)
    results = client_task(worker, "slow", batch=8).submit_many([1, 2, 3]).results
    assert [r.get(timeout=30) for r in results] == [1, 2, 3]
    for r in results:
        _wait_event(events, r.id, "task-succeeded")
        started = _by_type(events, r.id)["task-started"][0]["timestamp"]
        runtime = _by_type(events, r.id)["task-succeeded"][0]["runtime"]
        logged = re.findall(rf"Task {re.escape(T)}slow\[{r.id}\] succeeded in ([0-9.e-]+)s", worker.log())
        assert logged, worker.log()[-3000:]
        done = worker.client().AsyncResult(r.id).date_done
        if done.tzinfo is None:
            done = done.replace(tzinfo=timezone.utc)
        elapsed = done.timestamp() - started  # from the task-started event to the stored result
        assert runtime >= 1.0, f"the call slept 1 s; the event says {runtime}"
        assert abs(float(logged[0]) - runtime) < 0.01, (logged, runtime)
        assert runtime - 0.05 <= elapsed <= runtime + 1.5, (elapsed, runtime, done, datetime.fromtimestamp(started))


# -- items 1 and 4: self.retry() from inside the call; the items' requests as attributes -------------------


def test_self_retry_in_a_batched_call_retries_each_item_as_its_own_task(worker: Worker) -> None:
    since = time.time()
    events = record_events(worker.app, seconds=60)
    results = client_task(worker, "retry_call", batch=8).submit_many([1, 2, 3]).results
    got = [r.get(timeout=60) for r in results]
    expected = [(x, 2, 2, r.id) for x, r in zip([1, 2, 3], results, strict=True)]
    assert [(g["x"], g["retries"], g["legacy"], g["id"]) for g in got] == expected
    made = calls(worker, "retry_call", since)
    for x, r in zip([1, 2, 3], results, strict=True):
        seen = [n for c in made for i, n, id_ in zip(c["items"], c["retries"], c["ids"], strict=True)
                if i == x and id_ == r.id]
        assert seen == [0, 1, 2], made  # the same task id each time, its own retry count
        _wait_event(events, r.id, "task-succeeded")
        assert len(_by_type(events, r.id)["task-retried"]) == 2


def test_self_retry_in_a_batched_call_honours_each_items_count_countdown_and_exc(worker: Worker) -> None:
    events = record_events(worker.app, seconds=60)  # (it waits for a heartbeat: before the naps start)
    naps = occupy(worker, 2.0)  # both processes busy: the two items wait and leave in one call
    since = time.time()
    spent = worker.app.send_task(T + "retry_spent", args=[10], retries=1)  # its one retry is used up
    fresh = worker.app.send_task(T + "retry_spent", args=[20])
    for r in (spent, fresh):
        with pytest.raises(KeyError, match="again"):
            r.get(timeout=60)
        _wait_event(events, r.id, "task-failed")
    made = calls(worker, "retry_spent", since)
    first = made[0]
    assert sorted(zip(first["items"], first["retries"], strict=True)) == [(10, 1), (20, 0)], made
    assert [c["items"] for c in made[1:]] == [[20]] and made[1]["retries"] == [1], made
    assert made[1]["t"] - first["t"] >= 1.0, "countdown=1.0 honoured"
    assert "task-retried" not in _by_type(events, spent.id), "max_retries=1 was reached by this item alone"
    assert len(_by_type(events, fresh.id)["task-retried"]) == 1
    assert _by_type(events, fresh.id)["task-failed"][0]["exception"].startswith("KeyError('again")
    for n in naps:
        n.get(timeout=30)




# -- item 9: what the status command says of a worker without celery-gpu --------------------------------------


def test_status_names_a_plain_celery_worker_as_such(worker: Worker, prefork: Worker) -> None:
    from celery_gpu.cli import status

    replies = status.fetch(worker.app, timeout=2.0, destination=[worker.name, prefork.name])
    assert list(replies.workers) == [worker.name]
    text = status.render(replies.workers, 120, others=replies.others)
    assert f"{prefork.name}: not a celery-gpu worker" in text, (text, replies.others)


def test_an_unregistered_task_fails_with_celerys_not_registered_as_on_prefork(worker: Worker, prefork: Worker) -> None:
    from celery.exceptions import NotRegistered

    events = record_events(worker.app, seconds=60)
    results = [w.app.send_task(T + "no_such_task", args=[1]) for w in (worker, prefork)]
    for r in results:
        with pytest.raises(NotRegistered):  # stored by Celery's consumer: the client waiting on it is told
            r.get(timeout=30)
        _wait_event(events, r.id, "task-failed")
    ours, theirs = (_by_type(events, r.id)["task-failed"][0]["exception"] for r in results)
    assert ours == theirs == f"NotRegistered('{T}no_such_task')"
