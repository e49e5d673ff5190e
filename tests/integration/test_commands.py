"""The project's commands: ``celery-gpu worker`` and ``celery-gpu demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import make
from tests.worker import ROOT, Worker

pytestmark = pytest.mark.broker


def test_celery_gpu_worker_command_lays_out_devices_and_slots(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2", per_device=2, cli=True).start()
    try:
        pool = w.wait_ready()
        assert [(d["device"], len(d["slots"])) for d in pool["devices"]] == [("fake:0", 2), ("fake:1", 2)]
        stats = w.app.control.inspect([w.name]).stats()[w.name]
        assert stats["pool"]["implementation"] == "celery_gpu.worker.pool:GPUPool"
        assert stats["prefetch_count"] == 4
        ran = {w.app.send_task("tests.apps.basic.where", args=[i]).get(timeout=30)["pid"] for i in range(40)}
        assert ran == set(w.child_pids())
    finally:
        assert w.stop() == 0, w.log()


def test_celery_gpu_worker_rejects_an_unknown_device() -> None:
    run = subprocess.run([sys.executable, "-m", "celery_gpu.cli", "worker", "-A", "tests.apps.basic", "--gpus", "9"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "GPU index [9] not present" in run.stderr


@pytest.mark.parametrize("server", ["embedded", "redis", "rabbitmq"])
def test_demo_runs_and_prints_json(server: str) -> None:
    broker = [] if server == "embedded" else ["--broker", make(server, None, db=9).broker_url]
    run = subprocess.run([sys.executable, "-m", "celery_gpu.cli", "demo", "--items", "60", "--gpus", "fake:2",
                          "--per-gpu", "1", "--json", *broker], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["items"] == 60 and summary["items_per_s"] > 0 and summary["seconds"] > 0
    assert summary["devices"] == ["fake:0", "fake:1"] and summary["device_processes"] == 2
    assert summary["broker"] == ("embedded-redis" if server == "embedded" else
                                 make(server, None, db=9).broker_url.replace("guest:guest", "guest:**"))
    assert summary["workload"] in ("torch-mlp", "numpy-mlp")
    assert "item 0: label" in run.stdout
