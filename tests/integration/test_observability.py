"""Seeing the GPUs of a running worker: ``celery inspect gpu``, the ``worker-gpu`` event, the Prometheus
endpoint and ``celery-gpu status`` — on the embedded Redis, Redis and RabbitMQ, with fake devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.brokers import Broker, make
from tests.worker import ROOT, Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.batched."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=["embedded", "redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, embedded_url: str) -> Broker:
    return make(request.param, embedded_url)


@pytest.fixture(scope="module")
def worker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    port = free_port()
    w = Worker(broker, tmp_path_factory.mktemp("obs"), devices="fake:2x8GiB", app_module="tests.apps.batched",
               extra_env={"CELERY_GPU_METRICS_PORT": str(port), "CELERY_GPU_METRICS_ADDR": "127.0.0.1"})
    w.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    w.start()
    w.wait_ready()
    yield w
    assert w.stop() == 0, w.log()


def inspect_gpu(w: Worker) -> dict[str, Any]:
    replies = w.app.control.inspect([w.name], timeout=2)._request("gpu") or {}
    assert w.name in replies, replies
    reply: dict[str, Any] = replies[w.name]
    return reply


def test_inspect_gpu_reports_devices_processes_and_counters(worker: Worker) -> None:
    before = inspect_gpu(worker)
    assert [d["device"] for d in before["devices"]] == ["fake:0", "fake:1"]
    assert all(d["total_memory"] == 8 * 1024**3 and not d["quarantined"] for d in before["devices"])
    assert all(d["readings"]["source"] == "simulated" for d in before["devices"])
    done_before = sum(d["counters"]["succeeded"] for d in before["devices"])
    results = [worker.app.send_task(T + "double", args=[i]) for i in range(20)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(20)]
    with pytest.raises(Exception, match="exactly one positional argument"):  # BatchArgumentError, rebuilt
        worker.app.send_task(T + "double", args=[1, 2]).get(timeout=30)
    # The result is in the backend (written by the device process) a moment before its frame reaches the pool.
    assert wait_until(lambda: sum(d["counters"]["failed"] for d in inspect_gpu(worker)["devices"]) >= 1, 10)
    after = inspect_gpu(worker)
    assert sum(d["counters"]["succeeded"] for d in after["devices"]) - done_before == 20
    assert after["histograms"]["batch_size"][T + "double"]["count"] >= 1
    waits = after["histograms"]["queue_wait_seconds"]
    assert sum(h["count"] for h in waits.values()) >= 20
    slots = [s for d in after["devices"] for s in d["slots"]]
    assert len(slots) == 2 and all(s["pid"] and s["state"] == "idle" for s in slots)
    assert after["hostname"] == worker.name


def test_simulated_readings_follow_the_work(worker: Worker) -> None:
    nap = worker.app.send_task(T + "nap", args=[2.0])
    assert wait_until(lambda: any(d["readings"]["utilization"] == 1.0 for d in inspect_gpu(worker)["devices"]), 10)
    nap.get(timeout=30)
    assert wait_until(lambda: all(d["readings"]["utilization"] == 0.0 for d in inspect_gpu(worker)["devices"]), 10)


def test_worker_gpu_event_follows_heartbeats(worker: Worker) -> None:
    app = worker.app
    seen: list[dict[str, Any]] = []

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"worker-gpu": seen.append})
            try:
                recv.capture(limit=None, timeout=15, wakeup=False)
            except Exception:
                pass

    threading.Thread(target=listen, daemon=True).start()
    assert wait_until(lambda: any(e.get("hostname") == worker.name for e in seen), 15), "no worker-gpu event"
    event = next(e for e in seen if e.get("hostname") == worker.name)
    assert [d["device"] for d in event["gpu"]["devices"]] == ["fake:0", "fake:1"]
    assert "histograms" not in event["gpu"]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in the scrape:\n{text[:3000]}")


def test_metrics_endpoint_moves_with_the_work(worker: Worker) -> None:
    url: str = worker.metrics_url  # type: ignore[attr-defined]
    assert wait_until(lambda: "celery_gpu_slot_up" in scrape(url), 10)
    before = scrape(url)
    label = f'host="{worker.name}"'
    done = sum(metric(before, f'celery_gpu_tasks_total{{device="fake:{i}",{label},outcome="succeeded"}}')
               if f'device="fake:{i}",{label},outcome="succeeded"' in before else 0.0 for i in range(2))
    results = [worker.app.send_task(T + "square", args=[i]) for i in range(30)]
    assert [r.get(timeout=30) for r in results] == [i * i for i in range(30)]

    def counted() -> float:
        text = scrape(url)
        return sum(metric(text, f'celery_gpu_tasks_total{{device="fake:{i}",{label},outcome="succeeded"}}')
                   for i in range(2) if f'device="fake:{i}",{label},outcome="succeeded"' in text)

    assert wait_until(lambda: counted() - done >= 30, 10), scrape(url)
    text = scrape(url)
    for name in ("celery_gpu_device_memory_total_bytes", "celery_gpu_device_utilization_ratio",
                 "celery_gpu_slot_up", "celery_gpu_queue_wait_seconds_bucket", "celery_gpu_batch_size_bucket",
                 "celery_gpu_pending_tasks", "celery_gpu_device_quarantined"):
        assert name in text, name


def test_status_command_shows_the_worker(worker: Worker) -> None:
    env = dict(worker.env)
    out = subprocess.run([sys.executable, "-m", "celery_gpu.cli", "status", "-A", "tests.apps.batched", "--json",
                          "--timeout", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert worker.name in data["workers"]
    text = subprocess.run([sys.executable, "-m", "celery_gpu.cli", "status", "-A", "tests.apps.batched",
                           "--timeout", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert worker.name in text.stdout and "fake:0" in text.stdout and "fake:1" in text.stdout
    assert all(len(line) <= 80 for line in text.stdout.splitlines())


def test_celery_inspect_gpu_command_line(worker: Worker) -> None:
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.batched", "inspect", "gpu", "--json",
                          "-d", worker.name, "--timeout", "3"], cwd=ROOT, env=dict(worker.env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    replies = json.loads(out.stdout)
    assert [d["device"] for d in replies[worker.name]["devices"]] == ["fake:0", "fake:1"]
