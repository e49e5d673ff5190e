"""Chaos: device processes killed, poisoned, frozen, out of memory, leaking; the worker itself killed.

Every test keeps a ledger of executions (``tests.apps.chaos``) and asserts on it: nothing lost, duplicates
only where a process died with the task in flight, bounded attempts, no success from a poisoned process.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from tests.brokers import Broker
from tests.chaos.conftest import executions, ledger, start, task
from tests.worker import alive, wait_until

pytestmark = pytest.mark.broker


def outcome(result: Any, timeout: float = 60) -> Any:
    """A result's value, or the exception it failed with."""
    try:
        return result.get(timeout=timeout, propagate=True)
    except Exception as exc:
        return exc


def slot_pids(w: Any) -> dict[str, int]:
    pool = w.pool_stats()
    assert pool is not None, w.log()
    return {f"{d['device']}#{s['slot']}": s["pid"] for d in pool["devices"] for s in d["slots"] if s["pid"]}


def counters(w: Any) -> dict[str, dict[str, int]]:
    status = w.app.control.inspect([w.name], timeout=2).stats() or {}
    pool = status[w.name]["pool"]
    return pool


def test_random_kills_lose_nothing(redis_broker: Broker, tmp_path: Path) -> None:
    """1,000 tasks, 5 device processes SIGKILLed at random: every task succeeds once; only the tasks in flight
    in a killed process ran twice, and none more than the attempt limit."""
    w = start(redis_broker, tmp_path, env={"TEST_BATCH": "8"})
    try:
        results = task(w, "work", batch=8).submit_many(range(1000), kwargs={"pause": 0.1})
        killed: list[int] = []
        rng = random.Random(7)

        def victims() -> list[int]:
            # Live device processes whose latest call is a batch of several items. A task run again after a
            # kill runs alone, so no task is killed twice and the ledger can tell every kill's victims.
            latest = {e["pid"]: e for e in ledger(w)}
            return [p for p in slot_pids(w).values()
                    if p in latest and len(latest[p]["ids"]) > 1 and p not in killed and alive(p)]

        while len(killed) < 5:
            time.sleep(rng.uniform(0.2, 0.8))
            assert wait_until(lambda: bool(victims()), 30), w.log()[-3000:]
            pid = rng.choice(victims())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        values = [outcome(r, timeout=120) for r in results.results]
        assert [v["item"] if isinstance(v, dict) else v for v in values] == list(range(1000)), w.log()[-3000:]
        runs = executions(w)
        ids = [r.id for r in results.results]
        assert set(ids) <= set(runs), "every task ran"
        twice = {i: pids for i, pids in runs.items() if len(pids) > 1}
        assert all(len(pids) <= 2 for pids in runs.values())
        assert twice, "some tasks were in flight at a kill"
        for task_id, pids in twice.items():
            assert set(pids[:-1]) <= set(killed), (task_id, pids, killed)
        assert "Worker exited prematurely" not in w.log()
    finally:
        assert w.stop() == 0, w.log()


@pytest.mark.parametrize("which", ["redis", "rabbitmq"])
def test_worker_main_process_killed_with_acks_late(which: str, redis_broker: Broker, rabbit_broker: Broker,
                                                   tmp_path: Path) -> None:
    """SIGKILL the worker's main process mid-run (acks_late): its device processes die with it, and a new
    worker completes every task.

    On Redis the kill waits until the worker holds every message (no prefetch limit, the queue empty): the
    messages come back from the unacked index. Kills at random moments of the receive are
    ``tests/chaos/test_main_kills.py`` (issue 17, item 2).
    """
    broker = redis_broker if which == "redis" else rabbit_broker
    env = {"TEST_ACKS_LATE": "1", "TEST_VISIBILITY_TIMEOUT": "5"}
    if which == "redis":
        env["TEST_PREFETCH_MULTIPLIER"] = "0"
    w = start(broker, tmp_path, env=env)
    try:
        results = task(w, "work").submit_many(range(300), kwargs={"pause": 0.05})
        assert wait_until(lambda: len(ledger(w)) >= 3, 30), w.log()
        if which == "redis":
            with w.app.connection_for_read() as conn:  # kombu's count sums the queue's priority levels
                assert wait_until(lambda: conn.default_channel._size(w.queue) == 0, 30), "not every message taken"
    except BaseException:
        w.stop()
        raise
    children = list(slot_pids(w).values())
    assert w.proc is not None
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait()
    assert wait_until(lambda: not any(alive(p) for p in children), 10), "device processes outlive their worker"
    done_before = sum(r.ready() for r in results.results)
    assert done_before < 300, "the kill came too late to test anything"
    again = start(broker, tmp_path, env={**env, "TEST_LEDGER": w.env["TEST_LEDGER"]}, queue=w.queue)
    try:
        values = [outcome(r, timeout=120) for r in results.results]
        wrong = {i: v for i, v in enumerate(values) if not (isinstance(v, dict) and v["item"] == i)}
        assert not wrong, f"{len(wrong)} of 300 wrong, e.g. {list(wrong.items())[:5]}\n{again.log()[-6000:]}"
    finally:
        again.stop()


def test_poison_item_is_tried_at_most_three_times_and_its_batch_mates_succeed(redis_broker: Broker,
                                                                             tmp_path: Path) -> None:
    dead_letters = f"dead-{tmp_path.name[-12:]}"
    w = start(redis_broker, tmp_path, env={"CELERY_GPU_DEAD_LETTER_QUEUE": dead_letters})
    try:
        items: list[Any] = [*range(7), "poison", *range(7, 15)]
        results = task(w, "work").submit_many(items, kwargs={"pause": 0.2})
        values = [outcome(r) for r in results.results]
        poison = values[7]
        assert type(poison).__name__ == "TaskCrashedDevice", values
        assert "3 attempt(s)" in str(poison) and "signal 9" in str(poison)
        assert [v["item"] for i, v in enumerate(values) if i != 7] == [x for x in items if x != "poison"]
        runs = executions(w)
        assert len(runs[results.results[7].id]) == 3, "tried exactly the attempt limit"
        assert all(len(runs[r.id]) <= 2 for i, r in enumerate(results.results) if i != 7)
        with w.app.connection_for_read() as conn:
            queue = conn.SimpleQueue(dead_letters)
            message = queue.get(timeout=10)
            assert message.headers["id"] == results.results[7].id
            assert message.headers["x-celery-gpu-attempts"] == 3
            message.ack()
            queue.close()
    finally:
        assert w.stop() == 0, w.log()


def test_injected_oom_above_batch_8_splits_in_the_same_process_and_the_cap_grows_back(redis_broker: Broker,
                                                                                     tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:1", faults="oom_above=8", env={"CELERY_GPU_OOM_CAP_QUIET": "3"})
    try:
        pids = slot_pids(w)
        results = task(w, "work").submit_many(range(64))
        values = [outcome(r) for r in results.results]
        assert [v["item"] for v in values] == list(range(64)), values
        assert {v["pid"] for v in values} == set(pids.values()), "no process was replaced"
        assert slot_pids(w) == pids
        pool = counters(w)
        assert pool["memory"]["batch_caps"] == {"tests.apps.chaos.work@fake:0": 8}
        sizes = [len(e["ids"]) for e in ledger(w)]
        assert max(sizes) <= 8
        assert w.log().count("ran out of memory on fake:0 with 16 items") == 1
        time.sleep(3.2)  # a quiet period with no split: the cap doubles (8 -> 16), and 16 runs out of memory again
        again = task(w, "work").submit_many(range(64, 128))
        assert [outcome(r)["item"] for r in again.results] == list(range(64, 128))
        assert "its batches there may hold 16 items again" in w.log()
        assert w.log().count("ran out of memory on fake:0 with 16 items") == 2, w.log()[-3000:]
        assert counters(w)["memory"]["batch_caps"] == {"tests.apps.chaos.work@fake:0": 8}
    finally:
        assert w.stop() == 0, w.log()


def test_sticky_error_replaces_the_process_and_reports_nothing_after_it(redis_broker: Broker,
                                                                        tmp_path: Path) -> None:
    # Every process of the one device poisons itself at its fourth call: a broken device, which gpu_sticky_limit
    # would take out of service (tested below); here the replacement itself is under test.
    w = start(redis_broker, tmp_path, devices="fake:1", faults="sticky_after=3",
              env={"TEST_BATCH": "4", "CELERY_GPU_STICKY_LIMIT": "0"})
    try:
        first = slot_pids(w)["fake:0#0"]
        results = task(w, "work", batch=4).submit_many(range(40), kwargs={"pause": 0.02})
        values = [outcome(r) for r in results.results]
        assert [v["item"] for v in values] == list(range(40)), w.log()[-3000:]
        from_first = [v for v in values if v["pid"] == first]
        assert from_first and all(v["call"] < 3 for v in from_first), "no success after the error"
        assert len({v["pid"] for v in values}) >= 2, "the poisoned process was replaced"
        calls_of_first = [e for e in ledger(w) if e["pid"] == first]
        assert len(calls_of_first) == 3
        assert "sticky CUDA error" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_a_plain_task_hit_by_a_sticky_error_runs_again_elsewhere_and_repeats_quarantine(redis_broker: Broker,
                                                                                        tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:2", faults="sticky_after=0,on=0",
              env={"CELERY_GPU_STICKY_LIMIT": "2"})
    try:
        single = task(w, "single")
        clean = {pid for label, pid in slot_pids(w).items() if label.startswith("fake:1")}
        values: list[Any] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # placement alternates: some land on fake:0 (once it is back up)
            values.append(outcome(single.delay(len(values))))
            if any(d["failed"] for d in counters(w)["devices"]):
                break
            time.sleep(0.2)
        assert [v["item"] for v in values] == list(range(len(values))), w.log()[-3000:]
        assert all(v["pid"] in clean for v in values)
        assert "sticky CUDA error" in w.log()
        status = w.app.control.broadcast("gpu", reply=True, timeout=2, destination=[w.name])[0][w.name]
        fake0 = status["devices"][0]
        assert fake0["quarantined"] and "2 sticky CUDA errors within 600s" in fake0["reason"], fake0
        assert fake0["counters"]["sticky_errors"] == 2
        assert outcome(single.delay(99))["pid"] in clean
    finally:
        assert w.stop() == 0, w.log()


def test_hang_with_signals_masked_is_killed_within_the_limit(rabbit_broker: Broker, tmp_path: Path) -> None:
    """A call that hangs with every signal ignored, the GIL held: killed at its hard limit; meanwhile the other
    device keeps working and the worker's broker heartbeats (2 s) never lapse."""
    w = start(rabbit_broker, tmp_path, devices="fake:2", env={"TEST_BROKER_HEARTBEAT": "2"})
    try:
        single, hang_once = task(w, "single"), task(w, "hang_once")
        limit = 5.0
        marker = tmp_path / "hung"
        started = time.monotonic()
        hung = hang_once.apply_async((str(marker),), time_limit=limit)
        assert wait_until(marker.exists, 10), w.log()
        others = [outcome(single.delay(i)) for i in range(1, 4)]  # the other device, during the hang
        assert [o["item"] for o in others] == [1, 2, 3]
        assert isinstance(outcome(hung, timeout=30), TimeLimitExceeded)
        took = time.monotonic() - started
        assert took < limit + 3, took
        assert wait_until(lambda: not alive(int(marker.read_text())), 5), "the hung process was killed"
        assert "Connection to broker lost" not in w.log()
        assert outcome(single.delay(9))["item"] == 9
    finally:
        assert w.stop() == 0, w.log()


def test_a_frozen_process_without_a_time_limit_is_killed_by_the_heartbeat_watchdog(redis_broker: Broker,
                                                                                   tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:2", env={"CELERY_GPU_HEARTBEAT_TIMEOUT": "2"})
    try:
        marker = tmp_path / "frozen"
        started = time.monotonic()
        value = outcome(task(w, "hang_once").delay(str(marker)), timeout=60)
        frozen = int(marker.read_text())
        assert isinstance(value, dict) and value["pid"] != frozen, w.log()[-3000:]
        assert time.monotonic() - started < 2 + 10
        assert "sent no heartbeat" in w.log()
        assert [e["pid"] for e in ledger(w)] == [frozen, value["pid"]], "ran again once, in another process"
        assert wait_until(lambda: not alive(frozen), 10)
    finally:
        assert w.stop() == 0, w.log()


def test_a_leaking_process_is_recycled(redis_broker: Broker, tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:1", faults="leak=100MiB",
              env={"CELERY_GPU_RECYCLE_MEMORY": "250MiB"})
    try:
        single = task(w, "single")
        values = [outcome(single.delay(i)) for i in range(7)]
        pids = [v["pid"] for v in values]
        assert pids[0] == pids[1] == pids[2] != pids[3], pids  # replaced after its third task (300 MiB)
        assert pids[3] == pids[4] == pids[5] != pids[6], pids
        # The result is stored by the device process a moment before its done frame reaches the pool.
        assert wait_until(lambda: counters(w)["devices"][0]["slots"][0]["tasks_done"] == 7, 10), counters(w)
        assert "holds" in w.log() and "replacing it" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_a_device_that_keeps_failing_to_start_is_quarantined(redis_broker: Broker, tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:2", faults="fail_start,on=1",
              env={"CELERY_GPU_START_ATTEMPTS": "2"})
    try:
        assert wait_until(lambda: any(d["failed"] for d in counters(w)["devices"]), 30), w.log()
        devices = {d["device"]: d for d in counters(w)["devices"]}
        assert devices["fake:1"]["failed"] and not devices["fake:0"]["failed"]
        single = task(w, "single")
        assert [outcome(single.delay(i))["item"] for i in range(3)] == [0, 1, 2]
    finally:
        assert w.stop() == 0, w.log()


def test_memory_auto_learns_the_peak_then_shares_the_device(redis_broker: Broker, tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:1x1GiB", per_device=2, faults="peak=300MiB")
    try:
        auto = task(w, "auto")
        first = outcome(auto.delay(0, pause=0.3))
        assert first["item"] == 0
        # The result is stored by the device process before its `done` frame (which carries the peak) reaches the
        # pool: the pool may learn it a moment after the client sees the result.
        peak = {"tests.apps.chaos.auto": 300 * 2**20}
        assert wait_until(lambda: counters(w)["memory"]["learned_peaks"] == peak, 10), counters(w)["memory"]
        pair = [auto.delay(i, pause=1.0) for i in (1, 2)]
        ends = [outcome(r) for r in pair]
        starts = sorted(e["start"] for e in ledger(w) if e.get("start"))[-2:]
        assert starts[1] < min(e["end"] for e in ends), "two 360 MiB reservations share the 1 GiB device"
    finally:
        assert w.stop() == 0, w.log()

