"""Chaos: the worker's main process SIGKILLed at random moments while it receives (issue 17, item 2).

kombu's ``BRPOP`` takes a message out of its list into a reply; the unacked-index write follows in another
round trip. A main process that dies in between loses that message: it is in no list, no index, no result.
Each kill here is timed at random; before it, the main process is frozen (``SIGSTOP``) and the broker read:
the kill lands at the first of up to :data:`FREEZES` freezes where some task is in no list, no index and
has no result (in the window), else at the last one. With kombu's receive such a window shows in about one
freeze in ten, so nearly every kill lands in one; with the atomic receive none ever shows, and no kill loses
anything: every task succeeds, its message put back by the next worker once the dead one's lease lapsed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.brokers import Broker
from tests.chaos.conftest import start, task
from tests.worker import Worker, alive, wait_until

pytestmark = pytest.mark.broker

KILLS = 12
FREEZES = 10
TASKS = 1500
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")  # kombu's priority steps of a queue


def missing(broker: Broker, queue: str, ids: list[str]) -> list[str]:
    """Task ids that are in no list, no unacked-index entry, and have no result (read while the worker is
    frozen: only its device processes run, and they only add results)."""
    r = redis.Redis.from_url(broker.broker_url)
    backend = redis.Redis.from_url(broker.backend_url)
    try:
        seen: set[str] = set()
        for suffix in _PRIORITY_SUFFIXES:
            for raw in r.lrange(queue + suffix, 0, -1):
                seen.add(_task_id(json.loads(raw)))
        for raw in r.hvals("unacked"):
            seen.add(_task_id(json.loads(raw)[0]))
        rest = [i for i in ids if i not in seen]
        if not rest:
            return []
        stored = backend.mget([f"celery-task-meta-{i}" for i in rest])
        return [i for i, v in zip(rest, stored, strict=True) if v is None]
    finally:
        r.close()
        backend.close()


def _task_id(message: dict[str, Any]) -> str:
    return str(message.get("headers", {}).get("id", ""))


def kill_at_random(w: Worker, broker: Broker, ids: list[str], rng: random.Random) -> list[str]:
    """Freeze the worker at random moments until a task is in the window (or :data:`FREEZES` times), then
    SIGKILL it; returns the tasks that were in the window at the kill."""
    assert w.proc is not None
    in_window: list[str] = []
    for _ in range(FREEZES):
        time.sleep(rng.uniform(0.01, 0.15))
        w.proc.send_signal(signal.SIGSTOP)
        in_window = missing(broker, w.queue, ids)
        if in_window:
            break
        w.proc.send_signal(signal.SIGCONT)
    w.proc.send_signal(signal.SIGKILL)
    w.proc.send_signal(signal.SIGCONT)
    w.proc.wait()
    w.stop()
    return in_window


def test_randomly_timed_main_process_kills_lose_nothing(redis_broker: Broker, tmp_path: Path) -> None:
    env = {"TEST_ACKS_LATE": "1", "TEST_PREFETCH_MULTIPLIER": "1", "CELERY_GPU_BULK_RECEIVE": "0",
           "CELERY_GPU_INFLIGHT_LEASE": "2",
           "TEST_VISIBILITY_TIMEOUT": "3600"}  # nothing comes back by the visibility timeout within the test
    rng = random.Random(int(os.environ.get("TEST_SEED", "17")))
    w = start(redis_broker, tmp_path, devices="fake:1", env=env)
    results = task(w, "single").submit_many(range(TASKS))
    ids = [r.id for r in results.results]
    windows: list[list[str]] = []
    for _ in range(KILLS):
        assert wait_until(lambda: sum(r.ready() for r in results.results) > 0, 30), w.log()[-4000:]
        children = w.child_pids()
        windows.append(kill_at_random(w, redis_broker, ids, rng))
        assert wait_until(lambda c=children: not any(alive(p) for p in c), 10), "device processes outlive it"
        w = start(redis_broker, tmp_path, devices="fake:1", queue=w.queue,
                  env={**env, "TEST_LEDGER": w.env["TEST_LEDGER"]})
    try:
        assert wait_until(lambda: all(r.ready() for r in results.results), 120), (
            f"{sum(not r.ready() for r in results.results)} of {TASKS} never finished; kills in the window: "
            f"{[len(x) for x in windows]}\n{w.log()[-4000:]}")
        values = [r.get(timeout=5) for r in results.results]
        wrong = [i for i, v in enumerate(values) if v["item"] != i]
        assert not wrong, wrong[:10]
        assert not any(windows), f"a kill found tasks in no list, no index and no result: {windows}"
    finally:
        w.stop()
