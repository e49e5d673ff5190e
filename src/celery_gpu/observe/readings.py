"""Live readings of a device: utilization, memory used, temperature, power.

GPUs are read through NVML (``nvidia-ml-py``; reading NVML creates no CUDA context, so the worker's main
process may do it). Without NVML, or when a reading fails, the values are ``None`` and ``source`` says why;
nothing raises. The CPU device reports what Linux tells: utilization from ``/proc/stat`` since the previous
reading, memory from ``/proc/meminfo``. Fake devices report simulated values derived from the pool's own
state (busy processes, declared memory), so tests and demos see them move with the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..devices import Device
from .snapshot import Reading

__all__ = ["Readings", "empty"]

logger = logging.getLogger("celery_gpu.readings")


def empty(source: str = "none") -> Reading:
    """A reading with every value unknown."""
    return {"utilization": None, "memory_used": None, "memory_total": None, "temperature_c": None,
            "power_w": None, "source": source}


class Readings:
    """Takes readings of a worker's devices; one per pool. ``nvml`` is the ``pynvml`` module (tests pass a
    stand-in); by default it is imported on first use, and its absence is remembered, not retried."""

    def __init__(self, nvml: Any = None, proc_root: str = "/proc") -> None:
        self._nvml = nvml
        self._nvml_state = "given" if nvml is not None else "unknown"  # unknown | ready | absent | given
        self._proc = proc_root
        self._cpu_last: tuple[int, int] | None = None

    def read(self, device: Device, busy: int = 0, slots: int = 1, reserved: int = 0) -> Reading:
        """The current reading of ``device``; ``busy``/``slots``/``reserved`` feed fake devices' simulation."""
        try:
            if device.kind == "cuda":
                return self._cuda(device)
            if device.kind == "cpu":
                return self._cpu(device)
            return self._fake(device, busy, slots, reserved)
        except Exception as exc:  # a reading must never break inspect, events or metrics
            logger.debug("celery-gpu: reading %s failed: %r", device.label, exc)
            return empty("error")

    # -- kinds ---------------------------------------------------------------------------------------------

    def _cuda(self, device: Device) -> Reading:
        nvml = self._nvml_module()
        if nvml is None:
            return empty("none")
        handle = nvml.nvmlDeviceGetHandleByIndex(device.index)
        out = empty("nvml")
        out["utilization"] = _try(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        memory = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            out["memory_used"], out["memory_total"] = int(memory.used), int(memory.total)
        out["temperature_c"] = _try(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        out["power_w"] = _try(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # milliwatts
        return out

    def _cpu(self, device: Device) -> Reading:
        out = empty("proc")
        with open(f"{self._proc}/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        if self._cpu_last is not None and total > self._cpu_last[1]:
            busy = 1.0 - (idle - self._cpu_last[0]) / (total - self._cpu_last[1])
            out["utilization"] = round(min(max(busy, 0.0), 1.0), 4)
        self._cpu_last = (idle, total)
        info: dict[str, int] = {}
        with open(f"{self._proc}/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(rest.split()[0]) * 1024
        if "MemTotal" in info:
            out["memory_total"] = info["MemTotal"]
            if "MemAvailable" in info:
                out["memory_used"] = info["MemTotal"] - info["MemAvailable"]
        return out

    @staticmethod
    def _fake(device: Device, busy: int, slots: int, reserved: int) -> Reading:
        util = busy / slots if slots else 0.0
        return {"utilization": round(util, 4), "memory_used": min(reserved, device.total_memory),
                "memory_total": device.total_memory, "temperature_c": round(35.0 + 45.0 * util, 1),
                "power_w": round(50.0 + 250.0 * util, 1), "source": "simulated"}

    def _nvml_module(self) -> Any:
        if self._nvml_state in ("ready", "given"):
            return self._nvml
        if self._nvml_state == "absent":
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # not installed, no driver: readings say "none"
            logger.info("celery-gpu: NVML is not available (%s); GPU readings are empty", exc)
            self._nvml_state = "absent"
            return None
        self._nvml, self._nvml_state = pynvml, "ready"
        return pynvml


def _try(read: Callable[[], Any]) -> Any:
    """One NVML query; ``None`` when the device does not support it (NVMLError_NotSupported and the like)."""
    try:
        return read()
    except Exception:
        return None
