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
               extra_env={"CELERY_GPU_METRICS_PORT": str(port), "CELERY_GPU_METRICS_ADDR": "127.0.0.1",
                          "CELERY_GPU_COST_IN_RESULT": "1"})
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


def test_cost_per_item_in_inspect_metrics_and_result_meta(worker: Worker) -> None:
    nothing = {"items": 0, "device_s": 0.0, "energy_j": 0.0}
    before, naps = (inspect_gpu(worker)["costs"].get(T + name, nothing) for name in ("double", "nap"))
    nap = worker.app.send_task(T + "nap", args=[0.3])
    items = [worker.app.send_task(T + "double", args=[i], kwargs={"pause": 0.1}) for i in range(8)]
    assert [r.get(timeout=30) for r in items] == [2 * i for i in range(8)]
    assert nap.get(timeout=30) == 0.3
    # Each item's share of its call: the call's time (>= the pause) over the items of that call; fake devices
    # draw a simulated 300 W while a call runs.
    shares = [worker.app.backend.get_task_meta(r.id)["gpu_cost"] for r in items]
    assert all(0.1 / 8 <= s["device_s"] <= 5.0 for s in shares), shares
    assert all(abs(s["energy_j"] - 300 * s["device_s"]) <= 0.05 * 300 * s["device_s"] for s in shares), shares
    plain = worker.app.backend.get_task_meta(nap.id)["gpu_cost"]
    assert 0.3 <= plain["device_s"] < 5.0
    assert wait_until(lambda: inspect_gpu(worker)["costs"].get(T + "nap", nothing)["items"] == naps["items"] + 1, 10)
    costs = inspect_gpu(worker)["costs"]
    double = costs[T + "double"]
    assert double["items"] - before["items"] == 8
    assert double["device_s"] - before["device_s"] == pytest.approx(sum(s["device_s"] for s in shares), rel=0.01)
    assert double["energy_j"] == pytest.approx(300 * double["device_s"], rel=0.05)
    url: str = worker.metrics_url  # type: ignore[attr-defined]
    nap_seconds = f'celery_gpu_device_seconds_total{{host="{worker.name}",task="{T}nap"}}'
    assert wait_until(lambda: nap_seconds in scrape(url) and metric(scrape(url), nap_seconds) >= naps["device_s"] + 0.3,
                      10), scrape(url)
    text = scrape(url)
    assert metric(text, f'celery_gpu_energy_joules_total{{host="{worker.name}",task="{T}double"}}') > 0


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
    costs = [line.split() for line in text.stdout.splitlines() if line.lstrip().startswith("cost ")]
    assert costs and all(line[3::2] == ["items", "ms/item", "J/item"] for line in costs), text.stdout
    assert all(len(line) <= 80 for line in text.stdout.splitlines())


def test_celery_inspect_gpu_command_line(worker: Worker) -> None:
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "tests.apps.batched", "inspect", "gpu", "--json",
                          "-d", worker.name, "--timeout", "3"], cwd=ROOT, env=dict(worker.env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    replies = json.loads(out.stdout)
    assert [d["device"] for d in replies[worker.name]["devices"]] == ["fake:0", "fake:1"]
