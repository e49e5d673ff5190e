"""One kill-timing trial: a parent spawns a device process exactly as the pool does, and dies at a chosen moment.

The parent (a fresh interpreter) builds a :class:`~celery_gpu.worker.process.Slot` on a fake device for the test
app ``tests.apps.basic`` (whose setup hook logs its pid, then sleeps for ``TEST_SETUP_SLEEP``: a model load that
takes long, or never ends), calls ``Slot.spawn`` — the pool's own spawn — prints the child's pid, sleeps for the
delay and SIGKILLs itself. The trial then watches the child: an *orphan* is a child still alive
``grace`` seconds after its parent's death; ``setup_after_death`` says its setup hook started although the
parent was already dead. Used by ``tests/chaos/test_orphans.py`` (a few delays) and ``benchmarks/orphans.py``
(100 delays across the spawn window).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.worker import ROOT, alive, wait_until

_PARENT = """
import os, signal, sys, time
from celery_gpu.devices import discover
from celery_gpu.wire import protocol
from celery_gpu.worker.process import Slot

slot = Slot(discover("fake:1")[0], 0)
app = protocol.AppSpec("tests.apps.basic:app", ["tests.apps.basic"], [os.getcwd(), *sys.path], "orphans@test",
                       30, None)
delay = float(sys.argv[1])
slot.spawn(app, 1 << 20)
started = time.monotonic()
print(slot.pid, time.time(), flush=True)
time.sleep(max(0.0, delay - (time.monotonic() - started)))
print(time.time(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def trial(delay: float, tmp: Path, grace: float = 1.5) -> dict[str, Any]:
    """Kill the parent ``delay`` seconds after its ``Slot.spawn`` returned; what became of the child."""
    setup_log = tmp / f"setup-{os.urandom(4).hex()}.log"
    env = dict(os.environ, TEST_SETUP_LOG=str(setup_log), TEST_SETUP_SLEEP="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(delay)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert parent.stdout is not None
    line, death = parent.stdout.readline(), parent.stdout.readline()
    parent.wait(30)
    died = time.monotonic()
    if not line.strip() or not death.strip():
        raise AssertionError(f"the parent did not spawn (exit {parent.returncode})")
    child, spawned, death_time = int(line.split()[0]), float(line.split()[1]), float(death)
    gone = wait_until(lambda: not alive(child), grace, interval=0.01)
    lived = time.monotonic() - died
    if not gone:  # an orphan: do not leave it running
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The hook writes its line when it starts: a log written after the parent's death is a hook run by an orphan.
    setup_at = setup_log.stat().st_mtime if setup_log.exists() else None
    return {"delay": delay, "child": child, "orphan": not gone, "outlived_parent_s": round(lived, 3),
            "setup_started_s": None if setup_at is None else round(setup_at - spawned, 3),
            "setup_after_death": setup_at is not None and setup_at > death_time}
