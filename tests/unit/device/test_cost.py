"""What a call costs on its device: metered time, energy from NVML (a stand-in here) or simulated on fake devices,
the share of each item, and the result meta that can carry it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.device import cost
from celery_gpu.device.context import DeviceContext
from celery_gpu.device.split import call_batch
from celery_gpu.devices import Device
from celery_gpu.wire import protocol
from tests.unit.batched_tasks import make_task

FAKE = Device(0, "fake", "fake-0", 2**30)
CUDA = Device(3, "cuda", "H100", 80 * 2**30)


class NVML:
    """A stand-in for pynvml: an energy counter in millijoules that the test moves."""

    class NVMLError(Exception):
        pass

    def __init__(self, supported: bool = True) -> None:
        self.mj = 5_000_000
        self.supported = supported
        self.asked: list[int] = []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.asked.append(index)
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if not self.supported:
            raise self.NVMLError("Not Supported")
        return self.mj


def test_nvml_energy_is_read_in_joules_for_the_devices_nvml_index() -> None:
    nvml = NVML()
    meter = cost.Meter(CUDA, nvml=nvml)
    assert nvml.asked[0] == 3
    assert meter.joules() == 5000.0
    nvml.mj += 1500
    assert meter.joules() == 5001.5


def test_a_gpu_without_an_energy_counter_and_the_cpu_report_none() -> None:
    assert cost.Meter(CUDA, nvml=NVML(supported=False)).joules() is None
    assert cost.Meter(Device(0, "cpu", "cpu", 2**30)).joules() is None


def test_metered_calls_add_their_time_and_energy() -> None:
    nvml = NVML()
    ctx = DeviceContext(meter=cost.Meter(CUDA, nvml=nvml))
    mark = ctx.cost_mark()
    with ctx.metered():
        time.sleep(0.01)
        nvml.mj += 2500  # 2.5 J during the call
    with ctx.metered():
        nvml.mj += 500
    seconds, joules = ctx.cost_since(mark)
    assert seconds >= 0.01 and joules == pytest.approx(3.0)
    assert ctx.take_cost() == (seconds, joules)
    assert ctx.take_cost() == (0.0, None)


def test_without_a_meter_nothing_is_metered() -> None:
    ctx = DeviceContext()
    with ctx.metered():
        pass
    assert ctx.take_cost() == (0.0, None)


def test_a_batch_call_on_a_fake_device_is_charged_simulated_energy(gpu_app: tuple[Celery, GPU]) -> None:
    def slow(items: list[int]) -> list[int]:
        time.sleep(0.02)
        return items

    ctx = DeviceContext(meter=cost.meter_for(FAKE))
    task = make_task(gpu_app[1], slow)
    assert call_batch(ctx, task, [1, 2, 3, 4], {}) == [1, 2, 3, 4]
    seconds, joules = ctx.take_cost()
    assert seconds >= 0.02
    assert joules == pytest.approx(seconds * cost.FAKE_WATTS, rel=0.05)


def test_the_cost_travels_in_done_frames_and_is_read_back() -> None:
    outcome: protocol.Outcome = {"failed": False, "retval": "1", "runtime": 0.1}
    frame = protocol.batch_done(1, [outcome], 1, 0, None, 0, 0, (0.25, 75.0))
    assert (frame["device_s"], frame["energy_j"]) == (0.25, 75.0)
    read = protocol.read(dict(frame))
    assert read is not None and read["t"] == "batch_done" and read["energy_j"] == 75.0
    plain = protocol.read(dict(protocol.done(2, outcome, 0, None, 0, (0.5, None))))
    assert plain is not None and plain["t"] == "done"
    assert plain["device_s"] == 0.5 and "energy_j" not in plain
    assert "device_s" not in protocol.done(2, outcome, 0, None, 0, (0.0, None)), "nothing metered: no field"


def test_result_meta_carries_the_items_share(gpu_app: tuple[Celery, GPU]) -> None:
    app = gpu_app[0]
    share: list[Any] = [(0.004, 1.2)]
    cost.record_in_results(app.backend, lambda: share[0])
    meta = app.backend._get_result_meta(result=1, state="SUCCESS", traceback=None, request=None)
    assert meta["gpu_cost"] == {"device_s": 0.004, "energy_j": 1.2}
    share[0] = None
    meta = app.backend._get_result_meta(result=1, state="SUCCESS", traceback=None, request=None)
    assert "gpu_cost" not in meta
