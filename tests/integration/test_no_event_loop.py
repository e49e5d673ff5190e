"""Without an event loop (kombu's filesystem transport) the pool reads its pipes from a thread of its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from celery.exceptions import TimeLimitExceeded

from tests.brokers import Broker
from tests.worker import Worker, alive, wait_until

T = "tests.apps.basic."


def test_pool_thread_runs_tasks_limits_and_respawns(embedded_url: str, tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()
    w = Worker(Broker("filesystem", "filesystem://", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_FS_DIR": str(queue_dir)}, args=("--without-heartbeat",))
    w.app.conf.broker_transport_options = {"data_folder_in": str(queue_dir), "data_folder_out": str(queue_dir),
                                           "control_folder": str(queue_dir)}
    w.start()

    def setups() -> int:  # no remote control on this transport: count finished setup hooks instead
        return len(w.setup_log.read_text().splitlines()) if w.setup_log.exists() else 0

    def readies() -> int:  # the pool logs a process as ready only after its setup, when it takes work
        return w.log().count(" ready, pid ")

    try:
        assert wait_until(lambda: setups() == 2, 60), w.log()
        results = [w.app.send_task(T + "where", args=[i]) for i in range(40)]
        assert {r.get(timeout=60)["device"] for r in results} == {"fake:0", "fake:1"}
        with pytest.raises(TimeLimitExceeded):
            w.app.send_task(T + "hang").get(timeout=30)
        assert wait_until(lambda: setups() == 3, 60), w.log()  # the killed process was replaced
        victim = w.app.send_task(T + "where", args=[0]).get(timeout=30)["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not alive(victim), 10)
        assert wait_until(lambda: setups() == 4 and readies() == 4, 60), w.log()  # its replacement is up
        pids = {w.app.send_task(T + "where", args=[i]).get(timeout=30)["pid"] for i in range(20)}
        assert victim not in pids and len(pids) == 2
    finally:
        assert w.stop() == 0, w.log()
