"""A real worker process on the GPU pool (fake:4), against the embedded Redis, Redis and RabbitMQ."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from tests.brokers import Broker, make
from tests.worker import Worker, alive, wait_until, watch_events

pytestmark = pytest.mark.broker
T = "tests.apps.basic."


@pytest.fixture(scope="module", params=["embedded", "redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, embedded_url: str) -> Broker:
    return make(request.param, embedded_url)


@pytest.fixture(scope="module")
def worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(broker, tmp_path_factory.mktemp("w"), devices="fake:4", args=("-E",)).start()
    w.wait_ready()
    yield w
    assert w.stop() == 0, w.log()


def call(w: Worker, name: str, *args: Any, **options: Any) -> Any:
    return w.app.send_task(T + name, args=args, **options)


def slot_pids(w: Worker) -> dict[str, int]:
    pool = w.pool_stats()
    assert pool is not None
    return {f"{d['device']}#{s['slot']}": s["pid"] for d in pool["devices"] for s in d["slots"]}


def wait_all_idle(w: Worker, timeout: float = 30) -> dict[str, int]:
    def ready() -> bool:
        pool = w.pool_stats()
        return bool(pool) and all(s["state"] == "idle" for d in pool["devices"] for s in d["slots"])
    assert wait_until(ready, timeout), w.log()
    return slot_pids(w)


def test_each_process_sees_exactly_its_device(worker: Worker) -> None:
    results = [r.get(timeout=30) for r in [call(worker, "where", i) for i in range(200)]]
    by_pid: dict[int, set[tuple[str, str]]] = {}
    for r in results:
        by_pid.setdefault(r["pid"], set()).add((r["device"], r["cvd"]))
        assert r["setup_pid"] == r["pid"], "setup hook state must come from the same process"
    assert len(by_pid) == 4, by_pid
    seen = sorted(next(iter(v)) for v in by_pid.values())
    assert all(len(v) == 1 for v in by_pid.values())
    assert seen == [(f"fake:{i}", str(i)) for i in range(4)]
    assert sorted(by_pid) == sorted(slot_pids(worker).values())


def test_setup_runs_once_per_process_not_per_task(worker: Worker) -> None:
    pids = {r.get(timeout=30)["pid"] for r in [call(worker, "where", i) for i in range(100)]}
    lines = worker.setup_log.read_text().split()
    setup_pids = [int(p) for p in lines[0::2]]
    for pid in pids:
        assert setup_pids.count(pid) == 1


def test_thousand_tasks_over_fake4_all_succeed(worker: Worker) -> None:
    results = [call(worker, "add", i, i) for i in range(1000)]
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(1000)]
    assert all(r.state == "SUCCESS" for r in results)
    backend_view = worker.app.AsyncResult(results[-1].id)
    assert backend_view.result == 1998


def test_failures_retries_and_plain_tasks(worker: Worker, tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        call(worker, "boom", "kaput").get(timeout=30)
    assert type(info.value).__name__ == "ValueError" and "kaput" in str(info.value)
    assert call(worker, "flaky", str(tmp_path / "flaky"), 2).get(timeout=30) == 3
    assert call(worker, "plain", 21).get(timeout=30) == 42


def test_long_payloads_travel_through_shared_memory(worker: Worker) -> None:
    blobs = [f"{i:08d}" * (1 << 17) for i in range(6)]  # 1 MiB each, all different
    results = [call(worker, "echo", b) for b in blobs]
    assert [r.get(timeout=60) for r in results] == blobs
    def holds_segment(pid: int) -> bool:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if "celery-gpu-frames" in os.readlink(fd):
                    return True
            except OSError:  # closed meanwhile
                continue
        return False

    memfd_holders = [pid for pid in slot_pids(worker).values() if pid and holds_segment(pid)]
    assert memfd_holders, "the device processes that ran them hold a frame segment"
    shm = [n for n in (os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []) if "celery" in n]
    assert not shm, shm


def test_killing_a_device_process_mid_task_leaves_no_shared_memory_behind(worker: Worker) -> None:
    def memfds(pid: int) -> int:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                count += "celery-gpu-frames" in os.readlink(fd)
            except OSError:
                continue
        return count

    assert worker.proc is not None
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    wait_all_idle(worker)
    result = call(worker, "echo_slowly", "y" * (4 << 20), 30)  # 4 MiB through shared memory, then sleeps
    victims: list[int] = []
    for _ in range(3):  # each kill makes the pool run it again in another process, up to 3 attempts

        def running_again() -> bool:
            active = worker.app.control.inspect([worker.name]).active() or {}
            pids = [t["worker_pid"] for t in active.get(worker.name, []) if t["id"] == result.id]
            return bool(pids) and pids[0] not in victims and alive(pids[0])

        assert wait_until(running_again, 20), worker.log()[-2000:]
        victim = next(p for p in worker.app.control.inspect([worker.name]).active()[worker.name]
                      if p["id"] == result.id)["worker_pid"]
        os.kill(victim, signal.SIGKILL)
        victims.append(victim)
        assert wait_until(lambda v=victim: not alive(v), 10)
    with pytest.raises(Exception) as info:  # noqa: B017  (rebuilt on the client: matched by name)
        result.get(timeout=30)
    assert type(info.value).__name__ == "TaskCrashedDevice"
    wait_all_idle(worker)
    assert memfds(worker.proc.pid) <= 2 * 4, "at most one segment per slot, and mmap's duplicate of its fd"
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert shm_after <= shm_before, shm_after - shm_before


def test_numpy_arrays_travel_with_the_arrays_serializer(worker: Worker, tmp_path: Path) -> None:
    import numpy as np

    from celery_gpu.payload import arrays
    from celery_gpu.payload import claims as claimcheck

    arrays.register()
    claimcheck.configure(None)  # in the message itself (out of band: the next test)
    big = np.arange(3 * 1024 * 1024, dtype="<f4").reshape(1024, 3072)  # 12 MiB: through shared memory
    cases = [np.asfortranarray(np.ones((3, 4), dtype=">i8")), big, np.zeros((0, 5), dtype="u1")]
    for a in cases:
        got = call(worker, "array_stats", a, serializer=arrays.NAME).get(timeout=60)
        assert got["shape"] == list(a.shape) and got["dtype"] == a.dtype.str
        assert got["sum"] == float(a.astype("f8").sum())
    assert call(worker, "array_stats", big[:2], {"m": np.eye(2)}, serializer=arrays.NAME).get(
        timeout=60)["extra"] == {"m": [2, 2]}
    assert call(worker, "array_stats", cases[0], serializer=arrays.NAME).get(timeout=60)["fortran"]


def test_a_huge_payload_goes_out_of_band_and_is_deleted_once_consumed(worker: Worker) -> None:
    import numpy as np

    from celery_gpu.payload import arrays
    from celery_gpu.payload import claims as claimcheck

    arrays.register()
    store = claimcheck.redis_store_for_app(worker.app)  # the backend's Redis, as the worker's GPU(app) picks it
    assert isinstance(store, claimcheck.RedisStore)
    claimcheck.configure(lambda: store, threshold=1 << 20, ttl=600)
    try:
        client = worker.app.backend.client
        before = set(client.keys("celery-gpu-claim:*"))
        a = np.arange(4 << 20, dtype="<u1").reshape(1024, 4096)  # 4 MiB: above the 1 MiB threshold
        result = call(worker, "array_stats", a, serializer=arrays.NAME)
        assert set(client.keys("celery-gpu-claim:*")) - before or result.ready(), "stored out of band"
        got = result.get(timeout=60)
        assert got["shape"] == [1024, 4096] and got["sum"] == float(a.astype("f8").sum())
        assert wait_until(lambda: set(client.keys("celery-gpu-claim:*")) <= before, 10), "deleted once consumed"
    finally:
        claimcheck.configure(None)


def test_a_pickle_message_is_refused_and_runs_nothing(worker: Worker, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    body = pickle.dumps(((Evil(),), {}, {}))
    with worker.app.producer_or_acquire() as producer:
        producer.publish(body, routing_key=worker.queue, exchange="", content_type="application/x-python-serialize",
                         content_encoding="binary", serializer=None,
                         headers={"lang": "py", "task": T + "size", "id": "evil-" + worker.queue, "argsrepr": "()",
                                  "kwargsrepr": "{}", "retries": 0})
    assert call(worker, "add", 2, 3).get(timeout=30) == 5  # the worker lives on
    time.sleep(1)
    assert not marker.exists(), "a pickle payload must never be deserialized"
    assert "untrusted content" in worker.log() or "ContentDisallowed" in worker.log() or "refus" in worker.log()


def test_task_larger_than_any_device_fails_at_once(worker: Worker) -> None:
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        call(worker, "too_big").get(timeout=30)
    assert type(info.value).__name__ == "InsufficientDeviceMemory"
    assert time.monotonic() - started < 10


def test_sigkilled_device_process_is_replaced(worker: Worker) -> None:
    before = wait_all_idle(worker)
    victim_slot, victim = sorted(before.items())[1]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: slot_pids(worker)[victim_slot] not in (victim, None), 30), worker.log()
    after = wait_all_idle(worker)
    assert after[victim_slot] != victim and not alive(victim)
    pids = {r.get(timeout=30)["pid"] for r in [call(worker, "where", i) for i in range(100)]}
    assert victim not in pids and after[victim_slot] in pids


def test_a_task_whose_process_dies_runs_again_a_bounded_number_of_times(worker: Worker, tmp_path: Path) -> None:
    # `die` kills every process it runs in: 3 attempts, then a named failure (never WorkerLostError, which
    # acks_late + reject_on_worker_lost would redeliver forever).
    with pytest.raises(Exception) as info:  # noqa: B017  (rebuilt on the client: matched by name)
        call(worker, "die").get(timeout=60)
    assert type(info.value).__name__ == "TaskCrashedDevice"
    assert "3 attempt(s)" in str(info.value) and "signal 9 (SIGKILL)" in str(info.value)
    marker = tmp_path / "died"
    pid = call(worker, "die_once", str(marker)).get(timeout=60)  # run again by the pool, in another process
    assert int(marker.read_text()) != pid
    wait_all_idle(worker)


def test_hard_time_limit_kills_and_respawns(worker: Worker) -> None:
    wait_all_idle(worker)
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        call(worker, "hang").get(timeout=30)
    assert time.monotonic() - started < 10
    after = wait_all_idle(worker)
    assert len(after) == 4
    assert [r.get(timeout=30) for r in [call(worker, "add", 1, i) for i in range(20)]] == [1 + i for i in range(20)]


def test_soft_time_limit_raises_inside_the_task(worker: Worker) -> None:
    assert call(worker, "soft").get(timeout=30) == "soft limit caught"


def test_revoke_with_terminate(worker: Worker) -> None:
    before = wait_all_idle(worker)
    result = call(worker, "sleep", 30)
    assert wait_until(lambda: result.state == "STARTED" or worker.active_ids() == {result.id}, 20)
    worker.app.control.revoke(result.id, terminate=True)
    assert wait_until(lambda: result.state == "REVOKED", 20), result.state
    after = wait_all_idle(worker)
    assert len(set(after.values()) - set(before.values())) == 1  # the terminated process was replaced
    assert call(worker, "add", 2, 2).get(timeout=30) == 4


def test_inspect_active_and_stats_show_device_processes(worker: Worker) -> None:
    pids = wait_all_idle(worker)
    result = call(worker, "sleep", 3)
    assert wait_until(lambda: worker.active_ids() == {result.id}, 10)
    active = worker.app.control.inspect([worker.name]).active()[worker.name]
    assert active[0]["worker_pid"] in pids.values()
    stats = worker.app.control.inspect([worker.name]).stats()[worker.name]
    pool = stats["pool"]
    assert pool["max-concurrency"] == 4
    assert stats["prefetch_count"] == 4, "prefetch = device processes x worker_prefetch_multiplier (1)"
    assert [d["device"] for d in pool["devices"]] == [f"fake:{i}" for i in range(4)]
    assert [d["slots"][0]["cuda_visible_devices"] for d in pool["devices"]] == ["0", "1", "2", "3"]
    assert any(s["task"] == result.id for d in pool["devices"] for s in d["slots"])
    assert result.get(timeout=10) == 3


def test_task_events_are_sent(worker: Worker) -> None:
    seen = watch_events(worker.app)
    result = call(worker, "add", 3, 4)
    assert result.get(timeout=30) == 7
    assert wait_until(lambda: "task-succeeded" in seen.get(result.id, []), 15), seen.get(result.id)
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen[result.id])


def test_main_process_never_imports_torch(worker: Worker) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    version = call(worker, "torch_here").get(timeout=120)
    assert version
    assert worker.proc is not None
    main_maps = Path(f"/proc/{worker.proc.pid}/maps").read_text()
    assert "libtorch" not in main_maps and "libcuda" not in main_maps
    child_maps = [Path(f"/proc/{pid}/maps").read_text() for pid in slot_pids(worker).values() if alive(pid)]
    assert any("libtorch" in m for m in child_maps), "the device process that ran torch_here must map libtorch"


def test_warm_shutdown_finishes_in_flight_work(broker: Broker, tmp_path: Path) -> None:
    w = Worker(broker, tmp_path, devices="fake:2").start()
    w.wait_ready()
    children = w.child_pids()
    result = w.app.send_task(T + "sleep", args=[2])
    assert wait_until(lambda: w.active_ids() == {result.id}, 20)
    assert w.stop() == 0, w.log()  # SIGTERM while the task sleeps
    assert result.get(timeout=10) == 2
    assert not any(alive(pid) for pid in children)
