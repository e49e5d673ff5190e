"""The pool's counters and histograms, and device readings: NVML (a stand-in module), /proc for the CPU,
simulated values for fake devices, and no NVML at all."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from celery_gpu.devices import Device
from celery_gpu.observe.readings import Readings
from celery_gpu.observe.telemetry import FILL_WINDOW, SIZE_BUCKETS, FillWindow, Histogram, Telemetry


def test_histogram_is_cumulative_with_inf_last() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.5, 7.0):
        h.observe(v)
    assert h.as_json() == {"buckets": [[1.0, 2], [2.0, 3], [5.0, 3], ["+Inf", 4]], "sum": 10.0, "count": 4}


def test_telemetry_counts_per_device_and_task() -> None:
    t = Telemetry()
    t.started("fake:0", 0.002)
    t.ended("fake:0", False, 0.01)
    t.ended("fake:0", True, None)
    t.ended("fake:1", False, 0.5)
    t.restarted("fake:0", 1)
    t.restarted("fake:0", 1)
    t.batch("proj.embed", 64)
    t.reruns["fake:0"] += 3
    t.leak_recycles["fake:0"] += 1
    t.sticky_errors["fake:0"] += 2
    assert t.counters("fake:0") == {"succeeded": 1, "failed": 1, "restarts": 2, "oom_splits": 0, "reruns": 3,
                                    "leak_recycles": 1, "sticky_errors": 2}
    assert t.counters("fake:1")["succeeded"] == 1
    hist = t.histograms()
    assert hist["queue_wait_seconds"]["fake:0"]["count"] == 1
    assert hist["run_seconds"]["fake:0"]["count"] == 1, "an unknown runtime is not observed"
    size = hist["batch_size"]["proj.embed"]
    assert size["count"] == 1 and dict((str(b), n) for b, n in size["buckets"])["64"] == 1
    assert SIZE_BUCKETS[-1] >= 1024


def test_batch_fill_is_items_over_room_in_the_last_minute() -> None:
    now = [1000.0]
    window = FillWindow(clock=lambda: now[0])
    assert window.ratio() is None
    window.add(16, 64)
    window.add(64, 64)
    assert window.ratio() == 0.625
    now[0] += FILL_WINDOW - 1
    window.add(32, 64)
    assert window.ratio() == round(112 / 192, 4)
    now[0] += 1  # the first two batches leave the window
    assert window.ratio() == 0.5
    now[0] += FILL_WINDOW
    assert window.ratio() is None
    t = Telemetry()
    t.batch("proj.embed", 8, 32)
    t.batch("proj.plainish", 1)  # no room given (not a batched task): no fill
    assert t.batch_fill() == {"proj.embed": 0.25}


def test_costs_add_up_per_task() -> None:
    t = Telemetry()
    t.cost("proj.embed", 64, 0.5, None)
    t.cost("proj.embed", 32, 0.25, 30.0)
    t.cost("proj.plain", 1, 0.01, None)
    assert t.costs() == {"proj.embed": {"items": 96, "device_s": 0.75, "energy_j": 30.0},
                         "proj.plain": {"items": 1, "device_s": 0.01, "energy_j": None}}


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, power_supported: bool = True) -> None:
        self.power_supported = power_supported

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=10 * 1024**3, total=80 * 1024**3, free=70 * 1024**3)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 64

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if not self.power_supported:
            raise RuntimeError("NVMLError_NotSupported")
        return 412500


def test_cuda_readings_from_nvml() -> None:
    r = Readings(nvml=FakeNVML()).read(Device(0, "cuda", "H100", 80 * 1024**3))
    assert r == {"utilization": 0.87, "memory_used": 10 * 1024**3, "memory_total": 80 * 1024**3,
                 "temperature_c": 64.0, "power_w": 412.5, "source": "nvml"}


def test_an_unsupported_nvml_query_is_none_not_an_error() -> None:
    r = Readings(nvml=FakeNVML(power_supported=False)).read(Device(0, "cuda", "T4", 16 * 1024**3))
    assert r["power_w"] is None and r["utilization"] == 0.87


def test_no_nvml_gives_empty_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as when nvidia-ml-py is absent
    readings = Readings()
    r = readings.read(Device(0, "cuda", "H100", 1))
    assert r["source"] == "none" and r["utilization"] is None and r["memory_used"] is None
    assert readings.read(Device(1, "cuda", "H100", 1))["source"] == "none"


def test_cpu_readings_from_proc(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree:  1 kB\nMemAvailable:   4000000 kB\n")
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\n")
    readings = Readings(proc_root=str(tmp_path))
    first = readings.read(Device(0, "cpu", "cpu", 1))
    assert first["source"] == "proc" and first["utilization"] is None, "no interval yet"
    assert first["memory_total"] == 16000000 * 1024 and first["memory_used"] == 12000000 * 1024
    stat.write_text("cpu  150 0 150 900 0 0 0 0 0 0\n")  # +100 busy, +100 idle
    assert readings.read(Device(0, "cpu", "cpu", 1))["utilization"] == 0.5


def test_fake_devices_simulate_from_the_pool_state() -> None:
    readings = Readings()
    device = Device(1, "fake", "fake-1", 16 * 1024**3)
    idle = readings.read(device, busy=0, slots=2, reserved=0)
    busy = readings.read(device, busy=2, slots=2, reserved=4 * 1024**3)
    assert idle["source"] == busy["source"] == "simulated"
    assert (idle["utilization"], busy["utilization"]) == (0.0, 1.0)
    assert busy["memory_used"] == 4 * 1024**3 and busy["memory_total"] == 16 * 1024**3
    assert busy["temperature_c"] > idle["temperature_c"] and busy["power_w"] > idle["power_w"]


def test_a_failing_reading_never_raises(tmp_path: Path) -> None:
    readings = Readings(proc_root=str(tmp_path / "missing"))
    assert readings.read(Device(0, "cpu", "cpu", 1))["source"] == "error"
