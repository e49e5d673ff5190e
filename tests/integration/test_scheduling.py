"""Deadlines, priorities and the broker backlog on real workers (Redis and RabbitMQ): an item whose ``expires``
(or its task's ``deadline_ms``) passes while it waits in the pool ends REVOKED as Celery ends an expired task and
never reaches the device; a held batch leaves in time for a deadline; higher-priority items go first, in each
broker's order; the broker backlog and the autoscaling advice follow what waits."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Broker, make
from tests.worker import ROOT, Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.scheduling."


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Broker:
    return make(request.param, None, db=7)


class Events:
    """Task events received from the worker: ``(type, uuid, fields)``, filled by a thread."""

    def __init__(self, app: Any) -> None:
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._listen, args=(app,), daemon=True).start()

    def _listen(self, app: Any) -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": self.seen.append})
            try:
                recv.capture(limit=None, timeout=300, wakeup=False)
            except Exception:
                pass

    def of(self, task_id: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e.get("uuid") == task_id and e.get("type") == kind]


@pytest.fixture(scope="module")
def worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp = tmp_path_factory.mktemp("scheduling")
    w = Worker(broker, tmp, devices="fake:1", per_device=2, app_module="tests.apps.scheduling", args=("-E",),
               extra_env={"TEST_CALL_LOG": str(tmp / "calls.jsonl"), "CELERY_GPU_BACKLOG_INTERVAL": "0.3"})
    w.app.conf.task_queue_max_priority = 10  # the client declares the queue as the worker does (x-max-priority)
    w.start()
    w.wait_ready()
    w.events = Events(w.app)  # type: ignore[attr-defined]
    assert wait_until(lambda: any(e.get("type") == "worker-heartbeat" for e in w.events.seen), 15)  # type: ignore[attr-defined]
    yield w
    assert w.stop() == 0, w.log()


def calls(w: Worker, ids: set[str]) -> list[list[str]]:
    """The logged calls that carried any of ``ids``, in the order they started (each: the ids of its items)."""
    path = Path(w.env["TEST_CALL_LOG"])
    found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [c["ids"] for c in sorted(found, key=lambda c: c["t"]) if ids & set(c["ids"])]


def busy(w: Worker) -> int:
    pool = w.pool_stats()
    assert pool is not None, w.log()
    return sum(s["state"] == "busy" for d in pool["devices"] for s in d["slots"])


def occupy(w: Worker, *seconds: float) -> list[Any]:
    """Keep the device processes busy (one nap each) and wait until they are."""
    naps = [w.app.send_task(T + "nap", args=[s]) for s in seconds]
    assert wait_until(lambda: busy(w) == len(seconds), 10), w.log()
    return naps


def send(w: Worker, name: str, x: Any, **options: Any) -> Any:
    return w.app.send_task(T + name, args=[x], **options)


def test_items_expiring_while_they_wait_end_revoked_at_their_deadline_and_never_reach_the_device(
        worker: Worker) -> None:
    naps = occupy(worker, 1.6, 1.6)
    started = time.monotonic()
    doomed = [send(worker, "mark", i, expires=0.3) for i in range(3)]
    also = [send(worker, "tight", i) for i in range(2)]  # deadline_ms=300, no expires
    kept = [send(worker, "mark", 10 + i) for i in range(2)]
    # Ended while the device is still busy (1.6 s): at their deadline, not when a batch forms.
    assert wait_until(lambda: all(r.state == "REVOKED" for r in doomed + also), 1.2), \
        [r.state for r in doomed + also]
    assert time.monotonic() - started < 1.3
    assert [r.get(timeout=30) for r in kept] == [10, 11]
    assert [n.get(timeout=30) for n in naps] == [1.6, 1.6]
    ended = {r.id for r in doomed + also}
    assert not any(ended & set(c) for c in calls(worker, ended | {r.id for r in kept})), "never in a call"
    events = worker.events  # type: ignore[attr-defined]
    assert wait_until(lambda: all(events.of(r.id, "task-revoked") for r in doomed + also), 10)
    assert all(events.of(r.id, "task-revoked")[0]["expired"] is True for r in doomed + also)
    assert all(not events.of(r.id, "task-started") for r in doomed + also)
    expired = worker.app.control.broadcast("gpu", reply=True, timeout=2, destination=[worker.name])[0][worker.name]
    assert expired["expired"][T + "mark"] >= 3 and expired["expired"][T + "tight"] >= 2


def test_a_held_batch_leaves_in_time_for_its_earliest_deadline(worker: Worker) -> None:
    nap = occupy(worker, 1.5)[0]  # one process busy, one idle: a partial batch is held (max_wait 5 s)
    sent = time.time()
    item = send(worker, "mark", 7, expires=0.6)
    assert item.get(timeout=10) == 7
    (call,) = [c for c in json.loads("[" + ",".join(Path(worker.env["TEST_CALL_LOG"]).read_text().splitlines()) + "]")
               if item.id in c["ids"]]
    assert call["t"] - sent < 0.6, "left before its deadline, not after max_wait"
    nap.get(timeout=10)


def test_higher_priority_items_go_first_in_the_brokers_order(worker: Worker, broker: Broker) -> None:
    high, low = (0, 9) if broker.name == "redis" else (9, 0)  # Redis serves 0 first; RabbitMQ 9
    naps = occupy(worker, 0.8, 2.5)
    lows = [send(worker, "mark", i, priority=low) for i in range(8)]
    highs = [send(worker, "mark", 100 + i, priority=high) for i in range(4)]
    assert [r.get(timeout=30) for r in highs + lows] == [100, 101, 102, 103, *range(8)]
    order = calls(worker, {r.id for r in lows + highs})
    assert set(order[0]) == {r.id for r in highs}, "the first batch: the four high-priority items"
    assert [set(c) for c in order[1:]] == [{r.id for r in lows[:4]}, {r.id for r in lows[4:]}]
    for n in naps:
        n.get(timeout=30)


def test_broker_backlog_and_the_autoscaling_advice(worker: Worker) -> None:
    naps = occupy(worker, 2.0, 2.0)
    for i in range(40):
        send(worker, "mark", i, kwargs={"pause": 0.01})

    def scaling() -> dict[str, Any]:
        reply = worker.app.control.broadcast("gpu", reply=True, timeout=2, destination=[worker.name])
        return dict(reply[0][worker.name]["scaling"])

    assert wait_until(lambda: (scaling()["queues"].get(worker.queue) or 0) >= 20, 10), scaling()
    out = subprocess.run([sys.executable, "-m", "celery_gpu.cli", "status", "-A", "tests.apps.scheduling", "--json",
                          "--timeout", "2", "-d", worker.name, "--autoscale", "10"], cwd=ROOT,
                         env=dict(worker.env), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    advice, signals = data["autoscale"], data["workers"][worker.name]["scaling"]
    waiting = sum(t["waiting"] for t in signals["tasks"].values())
    assert advice["backlog"] == signals["queues"][worker.queue] >= 20 and advice["waiting"] == waiting >= 8
    assert advice["desired"] == math.ceil((advice["backlog"] + waiting) / 10) >= 3
    worker.app.control.purge()
    for n in naps:
        n.get(timeout=30)
    assert wait_until(lambda: scaling()["queues"].get(worker.queue) == 0, 10)
