"""Device processes never outlive their worker, and a warm shutdown lets every one of them finish (issue 17,
item 5).

* Kill timing: a parent spawns a device process exactly as the pool does (``Slot.spawn``) and is SIGKILLed
  at a chosen moment of the child's start (``tests/orphans.py``; ``benchmarks/orphans.py`` runs 100 of these
  across the spawn window). No child may survive its parent, and no setup hook may run in an orphan.
* Warm shutdown after a respawn: a replacement process started by the pool (on the pool's own thread where the
  transport has no event loop) finishes its task when the worker is stopped warm, on every transport.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.brokers import Broker, make
from tests.orphans import trial
from tests.worker import Worker, alive, wait_until

T = "tests.apps.basic."

#: Kill moments (seconds after ``Popen`` returned) spread over a device process's start, from its first
#: instruction to well after its setup hook began.
DELAYS = [0.0, 0.002, 0.01, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4, 0.7]


@pytest.mark.parametrize("delay", DELAYS)
def test_a_device_process_dies_with_its_parent_whenever_the_parent_dies(delay: float, tmp_path: Path) -> None:
    outcome = trial(delay, tmp_path)
    assert not outcome["orphan"], outcome
    assert not outcome["setup_after_death"], outcome


@pytest.mark.parametrize("which", ["filesystem", "redis", "rabbitmq"])
def test_warm_shutdown_lets_a_replacement_process_finish(which: str, embedded_url: str, tmp_path: Path) -> None:
    """Where the pool runs on its own thread (filesystem: no event loop), the replacement of a killed process
    was started from that thread; it must not die when the thread ends at shutdown (``PR_SET_PDEATHSIG``
    follows the thread that forked)."""
    env: dict[str, str] = {}
    args: tuple[str, ...] = ()
    if which == "filesystem":
        queue_dir = tmp_path / "queue"
        queue_dir.mkdir()
        broker = Broker("filesystem", "filesystem://", embedded_url)
        env["TEST_FS_DIR"] = str(queue_dir)
        args = ("--without-heartbeat",)
    else:
        broker = make(which, None, db=7)
    w = Worker(broker, tmp_path, devices="fake:1", extra_env=env, args=args)
    if which == "filesystem":
        w.app.conf.broker_transport_options = {"data_folder_in": env["TEST_FS_DIR"],
                                               "data_folder_out": env["TEST_FS_DIR"],
                                               "control_folder": env["TEST_FS_DIR"]}
    w.start()

    def setups() -> int:  # no remote control on the filesystem transport: count finished setup hooks instead
        return len(w.setup_log.read_text().splitlines()) if w.setup_log.exists() else 0

    try:
        first = w.app.send_task(T + "where", args=[1]).get(timeout=60)["pid"]
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: setups() == 2 and w.log().count(" ready, pid ") == 2, 60), w.log()
        marker = tmp_path / "started"
        # Long enough to be running when the pool stops: without an event loop Celery's consumer takes up to
        # 2 s (its drain timeout) to notice the SIGTERM before it stops the pool.
        running = w.app.send_task(T + "sleep_marked", args=[str(marker), 6])
        assert wait_until(marker.exists, 30), w.log()
        replacement = int(marker.read_text())
        assert replacement != first
    except BaseException:
        w.stop()
        raise
    assert w.stop() == 0, w.log()[-4000:]
    assert running.get(timeout=10, propagate=False) == replacement, w.log()[-4000:]
    assert "WorkerLostError" not in w.log() and "exited prematurely" not in w.log(), w.log()[-4000:]
    assert "replacing it" not in w.log(), w.log()[-4000:]  # no process was killed under the pool at shutdown
    assert not alive(replacement)
