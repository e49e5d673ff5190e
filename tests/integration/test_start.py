"""What a worker says and does at start (issue 16): the flags of Celery's command line it does otherwise (a
warning each), a pool that cannot run GPU tasks (refused), the CPU device's thread budget (read from torch inside
the device processes), readiness (``celery-gpu status --ready``, ``/ready``) and the metrics endpoint's address.

On the embedded Redis: what is checked here is the worker's start, the same on every broker.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import make
from tests.worker import ROOT, Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.basic."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    except OSError:
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def status_ready(w: Worker) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery_gpu.cli", "status", "-A", w.app_module, "--ready",
                           "-d", w.name, "--timeout", "2"], cwd=ROOT, env=w.env, capture_output=True, text=True,
                          timeout=60)


def budgets(w: Worker, n: int = 8) -> dict[int, dict[str, Any]]:
    """What torch says in each device process that ran one of ``n`` calls."""
    results = [w.app.send_task(T + "thread_budget") for _ in range(n)]
    return {r["pid"]: r for r in (res.get(timeout=120) for res in results)}


def test_flags_readiness_threads_and_metrics_address(embedded_url: str, tmp_path: Path) -> None:
    port = free_port()
    gate = tmp_path / "models-loaded"
    w = Worker(make("embedded", embedded_url), tmp_path, devices="cpu", per_device=1, cli=True,
               extra_env={"TEST_SETUP_GATE": str(gate)},
               args=("--cpu-threads", "1", "--metrics-port", str(port), "--metrics-address", "127.0.0.1",
                     "-c", "4", "--autoscale", "4,1", "-P", "prefork", "--max-memory-per-child", "100000"))
    w.start()
    try:
        # Celery's consumer is up (it answers ping) while the setup hooks still load their models: not ready.
        assert wait_until(lambda: bool(w.app.control.ping([w.name], timeout=0.5)), 60), w.log()
        code, body = get(f"http://127.0.0.1:{port}/ready")
        assert code == 503 and any("starting" in s for s in body["waiting_for"]), body
        probe = status_ready(w)
        assert probe.returncode == 1 and "not ready" in probe.stdout and "cpu#0 starting" in probe.stdout, probe
        gate.write_text("")  # the models are loaded
        assert wait_until(lambda: get(f"http://127.0.0.1:{port}/ready")[0] == 200, 60), w.log()
        assert get(f"http://127.0.0.1:{port}/ready")[1] == {"ready": True, "waiting_for": []}
        assert get(f"http://127.0.0.1:{port}/health")[0] == 200
        probe = status_ready(w)
        assert probe.returncode == 0 and probe.stdout.strip() == f"{w.name}: ready", probe

        seen = budgets(w, 2)  # --cpu-threads 1 (where one process alone would get every core)
        assert seen and all(b["torch"] == 1 and b["OMP_NUM_THREADS"] == "1" == b["MKL_NUM_THREADS"]
                            for b in seen.values()), seen

        log = w.log()
        for said in ("-c 4 is not used", "--autoscale 4,1 is not used", "-P prefork is not used",
                     "--max-memory-per-child 100000 is not used"):
            assert log.count(said) == 1, (said, log[-4000:])
        assert log.count("ready: 1 device process(es) take work") == 1, log[-4000:]
        assert log.count("metrics on http://") == 1 and f"metrics on http://127.0.0.1:{port}/metrics" in log, log
        stats = w.app.control.inspect([w.name], timeout=2).stats()[w.name]
        assert stats["pool"]["max-concurrency"] == 1
        assert stats["prefetch_count"] == 1, "sized to the pool, not to -c 4 or --autoscale's 4"
        with socket.socket() as other:  # bound to 127.0.0.1 only: the port is free on another loopback address
            other.bind(("127.0.0.2", port))
    finally:
        gate.write_text("")
        assert w.stop() == 0, w.log()


def test_cpu_device_processes_share_the_cores_by_default(embedded_url: str, tmp_path: Path) -> None:
    from celery_gpu.worker.threads import cores

    w = Worker(make("embedded", embedded_url), tmp_path, devices="cpu", per_device=2).start()
    try:
        w.wait_ready()
        seen = budgets(w)
        expected = max(1, cores() // 2)
        assert seen and all(b["torch"] == expected and b["OMP_NUM_THREADS"] == str(expected) for b in seen.values()), \
            (expected, seen)
    finally:
        assert w.stop() == 0, w.log()


def test_a_pool_that_cannot_run_gpu_tasks_is_refused_at_start(embedded_url: str, tmp_path: Path) -> None:
    broker = make("embedded", embedded_url)
    refused = Worker(broker, tmp_path, args=("-P", "threads")).start()
    assert refused.proc is not None
    try:
        refused.proc.wait(60)
    except subprocess.TimeoutExpired:
        refused.stop()
        raise AssertionError(f"a threads worker of a GPU app started:\n{refused.log()}") from None
    log = refused.log()
    assert refused.proc.returncode != 0
    assert "the threads pool cannot run GPU tasks" in log and f"queue '{refused.queue}'" in log, log
    assert "NotInDeviceProcess" in log and "Traceback" not in log, log
    refused.stop()

    # A worker of the same app for queues no GPU task is routed to may use any pool.
    other = Worker(broker, tmp_path, args=("-P", "solo", "-Q", f"io-{time.monotonic_ns()}")).start()
    try:
        assert wait_until(lambda: bool(other.app.control.ping([other.name], timeout=0.5)), 60), other.log()
    finally:
        assert other.stop() == 0, other.log()
