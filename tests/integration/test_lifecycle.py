"""Worker lifecycle: failing and slow setup hooks, bad input, and a SIGKILLed main process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.brokers import make
from tests.worker import Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.basic."


def test_failed_setup_marks_device_failed_others_keep_working(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_SETUP_FAIL": "fake:1"}).start()
    app = w.app
    try:
        pool = w.wait_ready()
        assert [d["failed"] for d in pool["devices"]] == [False, True]
        devices = {app.send_task(T + "where", args=[i]).get(timeout=30)["device"] for i in range(20)}
        assert devices == {"fake:0"}
        lines = w.setup_log.read_text().splitlines()
        assert sum(line.endswith("fake:1") for line in lines) == 1, lines  # tried once, not looped
        assert "setup refused on fake:1" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_a_setup_that_never_returns_marks_its_device_failed(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_SETUP_HANG": "fake:1", "CELERY_GPU_SETUP_TIMEOUT": "6"}).start()
    try:
        pool = w.wait_ready(timeout=30)
        assert [d["failed"] for d in pool["devices"]] == [False, True]
        assert pool["devices"][1]["slots"][0]["setup_error"] == "setup did not finish within 6s (gpu_setup_timeout)"
        assert {w.app.send_task(T + "where", args=[i]).get(timeout=30)["device"] for i in range(4)} == {"fake:0"}
        assert "is still starting after" in w.log() and "device fake:1 marked failed" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_worker_exits_when_every_device_fails(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_SETUP_FAIL": "all"}).start()
    assert w.proc is not None
    assert wait_until(lambda: w.proc.poll() is not None, 60), w.log()  # type: ignore[union-attr]
    assert w.proc.returncode != 0
    assert "every device failed" in w.log()


def test_slow_setup_has_no_time_limit_and_bad_input_fails_by_name(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:1",
               extra_env={"TEST_SETUP_SLEEP": "6", "CELERY_GPU_MAX_FRAME": "1MiB"}).start()
    try:
        # Slower than worker_process_init's 4 s budget: still comes up and runs tasks.
        pid = w.app.send_task(T + "where", args=[1]).get(timeout=60)["pid"]

        # A payload over the frame limit fails with a named error; nothing is lost or crashed.
        with pytest.raises(Exception) as info:
            w.app.send_task(T + "size", args=["x" * (2 << 20)]).get(timeout=30)
        assert type(info.value).__name__ == "FrameError" and "exceeds the maximum" in str(info.value)
        assert w.app.send_task(T + "size", args=["x" * 1000]).get(timeout=30) == 1000

        # Valid JSON that is not a task body ([args, kwargs, embed]): the task fails by name, the process lives on.
        # (A body that is not JSON at all never reaches the pool: Celery's consumer rejects it on receipt.)
        task_id = "malformed-" + w.queue
        with w.app.producer_or_acquire() as producer:
            producer.publish(
                b"[1, 2]", routing_key=w.queue, exchange="", content_type="application/json",
                content_encoding="utf-8", serializer=None,
                headers={"lang": "py", "task": T + "where", "id": task_id, "root_id": task_id, "retries": 0,
                         "argsrepr": "()", "kwargsrepr": "{}", "origin": "test", "ignore_result": False},
            )
        with pytest.raises(Exception) as info:
            w.app.AsyncResult(task_id).get(timeout=30)
        assert type(info.value).__name__ == "MalformedTaskMessage" and "[args, kwargs, embed]" in str(info.value)
        assert w.app.send_task(T + "where", args=[2]).get(timeout=30)["pid"] == pid
    finally:
        assert w.stop() == 0, w.log()


def test_device_processes_die_with_a_sigkilled_worker(embedded_url: str, tmp_path: Path) -> None:
    import os
    import signal

    from tests.worker import alive

    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2").start()
    w.wait_ready()
    children = w.child_pids()
    assert len(children) == 2 and all(alive(pid) for pid in children)
    assert w.proc is not None
    os.kill(w.proc.pid, signal.SIGKILL)  # no warm shutdown, no cleanup code runs in the main process
    w.proc.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in children), 10), "orphaned device processes"


def test_device_processes_log_to_the_worker_logfile(embedded_url: str, tmp_path: Path) -> None:
    logfile = tmp_path / "worker.log"
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2", args=("--logfile", str(logfile))).start()
    try:
        w.wait_ready()
        result = w.app.send_task(T + "where", args=[1])
        device = result.get(timeout=30)["device"]
        with pytest.raises(Exception, match="logged"):
            w.app.send_task(T + "boom", args=["logged"]).get(timeout=30)
    finally:
        assert w.stop() == 0, w.log()
    text = logfile.read_text()
    succeeded = [line for line in text.splitlines() if result.id in line and "succeeded" in line]
    assert succeeded and f"/{device}#0]" in succeeded[0], text[-2000:]  # the line names the device process
    assert "ValueError: logged" in text  # the failure's traceback is in the worker's log, not lost on a stderr


def test_pool_restart_replaces_every_process_after_its_task(embedded_url: str, tmp_path: Path) -> None:
    from tests.worker import alive

    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2").start()
    try:
        w.wait_ready()
        before = set(w.child_pids())
        running = w.app.send_task(T + "sleep", args=[3])
        assert wait_until(lambda: w.active_ids() == {running.id}, 10)
        replies = w.app.control.pool_restart(destination=[w.name], reply=True, timeout=5)
        assert replies and "ok" in replies[0][w.name]
        assert running.get(timeout=30) == 3  # the busy process finished its task first
        assert wait_until(lambda: (pool := w.pool_stats()) is not None and
                          all(s["state"] == "idle" for d in pool["devices"] for s in d["slots"]) and
                          not set(w.child_pids()) & before, 30), w.log()
        assert not any(alive(pid) for pid in before)
        pids = {w.app.send_task(T + "where", args=[i]).get(timeout=30)["setup_pid"] for i in range(20)}
        assert pids == set(w.child_pids())  # setup ran again in the new processes
    finally:
        assert w.stop() == 0, w.log()
