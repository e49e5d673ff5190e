"""What each call of task code cost on the device: its time, and its energy where the device can tell.

A device process meters every call of a task's function (a batch call, each call of a bisection, a plain
task's ``run``): wall time on a monotonic clock, and energy as the difference of the device's cumulative
energy counter before and after the call:

* CUDA devices: NVML's ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded; Volta and
  later). NVML creates no CUDA context. Unsupported (older GPUs, no ``nvidia-ml-py``): energy is ``None``.
* fake devices: simulated, :data:`FAKE_WATTS` for as long as a call runs, so the accounting can be tested.
* the CPU device: no energy reading (``None``).

An item's share is its call's cost divided by the items of that call; with ``gpu_cost_in_result`` it is stored
in the item's result meta as ``gpu_cost: {"device_s", "energy_j"}`` (:func:`record_in_results`). The energy
counter is the whole device's: with several processes on one device whose calls overlap, each call is charged
the device's energy while it ran (an upper bound, said so in docs/operations.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..devices import Device

__all__ = ["FAKE_WATTS", "Meter", "meter_for", "record_in_results"]

logger = logging.getLogger("celery_gpu.pool")

#: Power a fake device draws while a call runs (what its simulated readings show at full use).
FAKE_WATTS = 300.0


class Meter:
    """Reads a device's cumulative energy counter, in joules (``None`` where it cannot be read)."""

    def __init__(self, device: Device, nvml: Any = None) -> None:
        self.kind = device.kind
        self._nvml = nvml
        self._handle: Any = None
        if device.kind == "cuda":
            self._open_nvml(device.index)

    def _open_nvml(self, index: int) -> None:
        try:
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception as exc:  # no nvidia-ml-py, no driver, a GPU older than Volta: no energy readings
            logger.info("celery-gpu: no energy readings on cuda:%d (%s)", index, exc)
            self._handle = None

    def joules(self) -> float | None:
        """The device's energy counter now, in joules; ``None`` where there is none."""
        if self.kind == "fake":
            return time.monotonic() * FAKE_WATTS
        if self._handle is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0
        except Exception:
            return None


def meter_for(device: Device) -> Meter:
    """The meter of a device process pinned to ``device``."""
    return Meter(device)


def record_in_results(backend: Any, share: Callable[[], tuple[float, float | None] | None]) -> None:
    """Make ``backend`` add ``gpu_cost`` (``share()``: the task's or item's cost) to the result meta it stores.

    Key-value backends (Redis, ...) and the RPC backend keep the key; database backends store only their
    columns. A meta without a share (a task that made no metered call) is stored as Celery makes it.
    """
    make = backend._get_result_meta

    def with_cost(*args: Any, **kwargs: Any) -> Any:
        meta = make(*args, **kwargs)
        cost = share()
        if cost is not None and isinstance(meta, dict):
            meta["gpu_cost"] = {"device_s": cost[0], "energy_j": cost[1]}
        return meta

    backend._get_result_meta = with_cost
