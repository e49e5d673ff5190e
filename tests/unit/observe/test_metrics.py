"""The Prometheus exporter: metrics rendered from hand-made pool snapshots, and the HTTP server."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from celery_gpu.observe.metrics import MetricsExporter, MetricsPortInUse, render, start_exporter  # noqa: E402

HOST = "w1@host"


def _hist(buckets: list[list[Any]], total: float) -> dict[str, Any]:
    return {"buckets": buckets, "sum": total, "count": buckets[-1][1]}


def _snapshot() -> dict[str, Any]:
    """Two devices: a CUDA one with every reading, a fake one with nulls; slots in several states."""
    cuda = {
        "device": "cuda:0", "name": "NVIDIA H100", "kind": "cuda",
        "total_memory": 85899345920, "reserved_memory": 2147483648, "quarantined": False, "reason": None,
        "readings": {"utilization": 0.87, "memory_used": 123, "memory_total": 456, "temperature_c": 64.0,
                     "power_w": 412.5, "source": "nvml"},
        "slots": [
            {"slot": 0, "pid": 1234, "state": "busy", "task": "t-1", "tasks_done": 10, "restarts": 1},
            {"slot": 1, "pid": 1235, "state": "idle", "task": None, "tasks_done": 2, "restarts": 0},
            {"slot": 2, "pid": None, "state": "starting", "task": None, "tasks_done": 0, "restarts": 0},
        ],
        "counters": {"succeeded": 10, "failed": 2, "restarts": 1, "oom_splits": 3, "reruns": 5, "leak_recycles": 2,
                     "sticky_errors": 4},
    }
    fake = {
        "device": "fake:0", "name": "fake", "kind": "fake",
        "total_memory": 1000, "reserved_memory": 0, "quarantined": True, "reason": "boom",
        "readings": {"utilization": None, "memory_used": None, "memory_total": None, "temperature_c": None,
                     "power_w": None, "source": "simulated"},
        "slots": [
            {"slot": 0, "pid": 99, "state": "failed", "task": None, "tasks_done": 0, "restarts": 4},
            {"slot": 1, "pid": 98, "state": "down", "task": None, "tasks_done": 0, "restarts": 0},
        ],
        "counters": {"succeeded": 0, "failed": 7, "restarts": 4, "oom_splits": 0},
    }
    return {
        "hostname": HOST,
        "timestamp": time.time() - 5.0,
        "pending": 3,
        "devices": [cuda, fake],
        "batching": {"proj.embed": {"batches": 5, "items": 300, "calls": 6, "mean_batch": 60.0, "waiting": 4}},
        "histograms": {
            "queue_wait_seconds": {"cuda:0": _hist([[0.001, 3], [0.005, 7], ["+Inf", 10]], 0.12)},
            "run_seconds": {"cuda:0": _hist([[0.1, 4], [1.0, 9], ["+Inf", 10]], 4.5)},
            "batch_size": {"proj.embed": _hist([[1, 0], [64, 5], ["+Inf", 5]], 300)},
        },
        "costs": {"proj.embed": {"items": 300, "device_s": 1.5, "energy_j": 450.0},
                  "proj.plain": {"items": 7, "device_s": 0.07, "energy_j": None}},
        "scaling": {"queues": {"gpu": 1200, "unknown": None}, "sampled_at": time.time(),
                    "tasks": {"proj.embed": {"waiting": 4, "batch_fill": 0.75, "item_memory": 2**20},
                              "proj.plain": {"waiting": 2, "batch_fill": None, "item_memory": None}}},
    }


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset({"host": HOST, **labels}.items()))]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


@pytest.fixture
def exporter_factory() -> Iterator[list[MetricsExporter]]:
    """Exporters started by a test, stopped afterwards."""
    started: list[MetricsExporter] = []
    yield started
    for exporter in started:
        exporter.stop()


# -- render ------------------------------------------------------------------------------------------------


def test_device_readings() -> None:
    s = _samples(render(_snapshot()))
    assert _value(s, "celery_gpu_device_utilization_ratio", device="cuda:0") == 0.87
    assert _value(s, "celery_gpu_device_memory_used_bytes", device="cuda:0") == 123
    assert _value(s, "celery_gpu_device_memory_total_bytes", device="cuda:0") == 456  # the reading wins
    assert _value(s, "celery_gpu_device_temperature_celsius", device="cuda:0") == 64.0
    assert _value(s, "celery_gpu_device_power_watts", device="cuda:0") == 412.5
    assert _value(s, "celery_gpu_device_memory_reserved_bytes", device="cuda:0") == 2147483648
    assert _value(s, "celery_gpu_device_quarantined", device="cuda:0") == 0
    info = {"device": "cuda:0", "name": "NVIDIA H100", "kind": "cuda", "source": "nvml"}
    assert _value(s, "celery_gpu_device_info", **info) == 1


def test_null_readings_are_omitted() -> None:
    text = render(_snapshot())
    s = _samples(text)
    for name in ("utilization_ratio", "memory_used_bytes", "temperature_celsius", "power_watts"):
        assert f'celery_gpu_device_{name}{{device="fake:0"' not in text
        assert (f"celery_gpu_device_{name}", frozenset({"host": HOST, "device": "fake:0"}.items())) not in s
    assert _value(s, "celery_gpu_device_memory_total_bytes", device="fake:0") == 1000  # falls back to total_memory
    assert _value(s, "celery_gpu_device_quarantined", device="fake:0") == 1
    info = {"device": "fake:0", "name": "fake", "kind": "fake", "source": "simulated"}
    assert _value(s, "celery_gpu_device_info", **info) == 1


def test_no_readings_at_all() -> None:
    snap = _snapshot()
    del snap["devices"][1]["readings"]
    snap["devices"][1]["total_memory"] = None
    s = _samples(render(snap))
    assert ("celery_gpu_device_memory_total_bytes", frozenset({"host": HOST, "device": "fake:0"}.items())) not in s
    info = {"device": "fake:0", "name": "fake", "kind": "fake", "source": "none"}
    assert _value(s, "celery_gpu_device_info", **info) == 1


def test_slots() -> None:
    s = _samples(render(_snapshot()))
    expected = {  # (device, slot): (up, busy, restarts)
        ("cuda:0", "0"): (1, 1, 1),
        ("cuda:0", "1"): (1, 0, 0),
        ("cuda:0", "2"): (0, 0, 0),  # starting, no pid yet
        ("fake:0", "0"): (0, 0, 4),  # failed
        ("fake:0", "1"): (0, 0, 0),  # down
    }
    for (device, slot), (up, busy, restarts) in expected.items():
        assert _value(s, "celery_gpu_slot_up", device=device, slot=slot) == up
        assert _value(s, "celery_gpu_slot_busy", device=device, slot=slot) == busy
        assert _value(s, "celery_gpu_process_restarts_total", device=device, slot=slot) == restarts


def test_counters() -> None:
    text = render(_snapshot())
    assert "# TYPE celery_gpu_tasks_total counter" in text
    s = _samples(text)
    assert _value(s, "celery_gpu_tasks_total", device="cuda:0", outcome="succeeded") == 10
    assert _value(s, "celery_gpu_tasks_total", device="cuda:0", outcome="failed") == 2
    assert _value(s, "celery_gpu_tasks_total", device="fake:0", outcome="failed") == 7
    assert _value(s, "celery_gpu_oom_splits_total", device="cuda:0") == 3
    assert _value(s, "celery_gpu_task_reruns_total", device="cuda:0") == 5
    assert _value(s, "celery_gpu_leak_recycles_total", device="cuda:0") == 2
    assert _value(s, "celery_gpu_sticky_errors_total", device="cuda:0") == 4
    assert _value(s, "celery_gpu_sticky_errors_total", device="fake:0") == 0, "an older worker's snapshot: 0"
    assert _value(s, "celery_gpu_task_reruns_total", device="fake:0") == 0, "an older worker's snapshot: 0"
    assert "celery_gpu_tasks_total_total" not in text


def test_pool_and_batching() -> None:
    s = _samples(render(_snapshot()))
    assert _value(s, "celery_gpu_pending_tasks") == 3
    assert _value(s, "celery_gpu_batch_waiting_items", task="proj.embed") == 4
    assert _value(s, "celery_gpu_batches_total", task="proj.embed") == 5
    assert _value(s, "celery_gpu_batch_items_total", task="proj.embed") == 300
    assert _value(s, "celery_gpu_batch_calls_total", task="proj.embed") == 6
    assert 4.0 < _value(s, "celery_gpu_snapshot_age_seconds") < 60.0


def test_autoscaling_signals() -> None:
    snap = _snapshot()
    snap["devices"][0]["headroom"] = 5 * 2**30
    s = _samples(render(snap))
    assert _value(s, "celery_gpu_queue_backlog_messages", queue="gpu") == 1200
    assert ("celery_gpu_queue_backlog_messages", frozenset({"host": HOST, "queue": "unknown"}.items())) not in s
    assert _value(s, "celery_gpu_waiting_items", task="proj.embed") == 4
    assert _value(s, "celery_gpu_waiting_items", task="proj.plain") == 2
    assert _value(s, "celery_gpu_batch_fill_ratio", task="proj.embed") == 0.75
    assert _value(s, "celery_gpu_task_item_memory_bytes", task="proj.embed") == 2**20
    assert _value(s, "celery_gpu_device_memory_headroom_bytes", device="cuda:0") == 5 * 2**30
    assert ("celery_gpu_device_memory_headroom_bytes", frozenset({"host": HOST, "device": "fake:0"}.items())) \
        not in s, "an older worker's snapshot: no sample"


def test_models_per_device() -> None:
    snap = _snapshot()
    snap["devices"][0]["models"] = {"bert": {"resident_bytes": 3 * 2**30, "loads": 2, "evictions": 1}}
    s = _samples(render(snap))
    assert _value(s, "celery_gpu_model_resident_bytes", device="cuda:0", model="bert") == 3 * 2**30
    assert _value(s, "celery_gpu_model_loads_total", device="cuda:0", model="bert") == 2
    assert _value(s, "celery_gpu_model_evictions_total", device="cuda:0", model="bert") == 1


def test_cost_per_task() -> None:
    s = _samples(render(_snapshot()))
    assert _value(s, "celery_gpu_device_seconds_total", task="proj.embed") == 1.5
    assert _value(s, "celery_gpu_energy_joules_total", task="proj.embed") == 450.0
    assert _value(s, "celery_gpu_metered_items_total", task="proj.embed") == 300
    assert _value(s, "celery_gpu_device_seconds_total", task="proj.plain") == 0.07
    assert ("celery_gpu_energy_joules_total", frozenset({"host": HOST, "task": "proj.plain"}.items())) not in s, \
        "no energy reading: no sample"


def test_histograms() -> None:
    text = render(_snapshot())
    assert "# TYPE celery_gpu_queue_wait_seconds histogram" in text
    assert 'celery_gpu_queue_wait_seconds_bucket{device="cuda:0",host="w1@host",le="0.005"} 7.0' in text
    assert 'celery_gpu_queue_wait_seconds_bucket{device="cuda:0",host="w1@host",le="+Inf"} 10.0' in text
    assert 'celery_gpu_queue_wait_seconds_sum{device="cuda:0",host="w1@host"} 0.12' in text
    assert 'celery_gpu_queue_wait_seconds_count{device="cuda:0",host="w1@host"} 10.0' in text
    s = _samples(text)
    assert _value(s, "celery_gpu_task_run_seconds_bucket", device="cuda:0", le="1.0") == 9
    assert _value(s, "celery_gpu_task_run_seconds_sum", device="cuda:0") == 4.5
    assert _value(s, "celery_gpu_task_run_seconds_count", device="cuda:0") == 10
    assert _value(s, "celery_gpu_batch_size_bucket", task="proj.embed", le="64.0") == 5
    assert _value(s, "celery_gpu_batch_size_bucket", task="proj.embed", le="+Inf") == 5
    assert _value(s, "celery_gpu_batch_size_count", task="proj.embed") == 5


def test_histogram_without_inf_bucket_gets_one() -> None:
    snap = _snapshot()
    snap["histograms"]["run_seconds"]["cuda:0"]["buckets"].pop()
    s = _samples(render(snap))
    assert _value(s, "celery_gpu_task_run_seconds_bucket", device="cuda:0", le="+Inf") == 10


def test_empty_families_are_not_exported() -> None:
    snap = _snapshot()
    snap["devices"], snap["batching"], snap["costs"] = [], {}, {}
    snap["scaling"] = {"queues": {}, "sampled_at": 0.0, "tasks": {}}
    snap["histograms"] = {"queue_wait_seconds": {}, "run_seconds": {}, "batch_size": {}}
    text = render(snap)
    assert "celery_gpu_device" not in text
    assert "celery_gpu_queue_wait_seconds" not in text
    assert _value(_samples(text), "celery_gpu_pending_tasks") == 3


def test_no_snapshot_renders_nothing() -> None:
    assert render(None) == ""


def test_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(RuntimeError, match=r"pip install 'celery-gpu\[prometheus\]'"):
        render(_snapshot())
    exporter = start_exporter(0, lambda: None, addr="127.0.0.1")  # /ready and /health need no prometheus-client
    try:
        with pytest.raises(urllib.error.HTTPError) as raised:
            _scrape(exporter.port)
        assert raised.value.code == 503 and b"pip install 'celery-gpu[prometheus]'" in raised.value.read()
    finally:
        exporter.stop()


# -- start_exporter ----------------------------------------------------------------------------------------


def test_scrape_follows_the_snapshot(exporter_factory: list[MetricsExporter]) -> None:
    snap = _snapshot()
    exporter = start_exporter(0, lambda: snap, addr="127.0.0.1")
    exporter_factory.append(exporter)
    assert exporter.port > 0
    s = _samples(_scrape(exporter.port))
    assert _value(s, "celery_gpu_tasks_total", device="cuda:0", outcome="succeeded") == 10

    snap["devices"][0]["counters"]["succeeded"] = 15  # the pool's next snapshot
    s = _samples(_scrape(exporter.port))
    assert _value(s, "celery_gpu_tasks_total", device="cuda:0", outcome="succeeded") == 15


def test_scrape_before_the_pool_started(exporter_factory: list[MetricsExporter]) -> None:
    exporter = start_exporter(0, lambda: None, addr="127.0.0.1")
    exporter_factory.append(exporter)
    assert "celery_gpu_device" not in _scrape(exporter.port)


def test_failing_snapshot_exports_nothing(exporter_factory: list[MetricsExporter]) -> None:
    def broken() -> dict[str, Any] | None:
        raise ValueError("no snapshot")

    exporter = start_exporter(0, broken, addr="127.0.0.1")
    exporter_factory.append(exporter)
    assert "celery_gpu_" not in _scrape(exporter.port)


def test_port_in_use(exporter_factory: list[MetricsExporter]) -> None:
    first = start_exporter(0, lambda: None, addr="127.0.0.1")
    exporter_factory.append(first)
    with pytest.raises(MetricsPortInUse, match=str(first.port)) as raised:
        start_exporter(first.port, lambda: None, addr="127.0.0.1")
    assert isinstance(raised.value, OSError)


def test_stop_frees_the_port(exporter_factory: list[MetricsExporter]) -> None:
    first = start_exporter(0, _snapshot, addr="127.0.0.1")
    _scrape(first.port)
    first.stop()
    first.stop()  # idempotent
    second = start_exporter(first.port, _snapshot, addr="127.0.0.1")
    exporter_factory.append(second)
    assert second.port == first.port
    assert "celery_gpu_pending_tasks" in _scrape(second.port)
