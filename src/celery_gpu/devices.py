"""Devices: what a device process is pinned to.

Three kinds share one type: NVML-discovered CUDA GPUs, the CPU, and fake devices (``fake:4x16GiB``) that
behave like GPUs for scheduling and pinning so that everything can be tested on a machine without a GPU.
Discovery never creates a CUDA context: it reads NVML only, so the worker's main process holds no context and maps
no framework (NVML itself maps the driver library, ``libcuda``, on current drivers; tests/gpu/cuda_free.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import DeviceSpecError, NotInDeviceProcess
from .units import parse_memory

__all__ = ["DEFAULT_FAKE_MEMORY", "Device", "DeviceKind", "current_device", "discover", "set_current"]

DeviceKind = Literal["cuda", "cpu", "fake"]

DEFAULT_FAKE_MEMORY = 16 * 1024**3


@dataclass
class Device:
    """One device a worker runs tasks on.

    Attributes:
        index: the device's index in its kind (NVML index for CUDA, 0 for the CPU, N for ``fake:N``).
        kind: ``"cuda"``, ``"cpu"`` or ``"fake"``.
        name: a human name (``"NVIDIA H100 80GB HBM3"``, ``"cpu"``, ``"fake-2"``).
        total_memory: bytes of device memory used for admission.
        state: per-process resources set by ``@gpu.setup`` hooks (models, buffers); never leaves the process.
    """

    index: int
    kind: DeviceKind
    name: str
    total_memory: int
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        """Short unique name: ``cuda:1``, ``cpu``, ``fake:3``."""
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"

    @property
    def torch(self) -> str:
        """The torch device string inside this device's processes.

        A CUDA device process sees only its own GPU (``CUDA_VISIBLE_DEVICES``), so it is always ``cuda:0``.
        Fake devices and the CPU compute on the CPU.
        """
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        """The ``CUDA_VISIBLE_DEVICES`` a process pinned to this device starts with.

        Fake devices are pinned like GPUs (their index), the CPU sees no GPU at all.
        """
        return "" if self.kind == "cpu" else str(self.index)

    def to_wire(self) -> dict[str, Any]:
        """Plain-data form (no state) for the device process's start-up description."""
        return {"index": self.index, "kind": self.kind, "name": self.name, "total_memory": self.total_memory}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Device:
        """Inverse of :meth:`to_wire`."""
        return cls(int(data["index"]), data["kind"], str(data["name"]), int(data["total_memory"]))


def _cpu() -> Device:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 0
    return Device(0, "cpu", "cpu", int(total))


def _nvml_gpus() -> list[Device]:
    """GPUs as NVML sees them, in PCI bus order; empty when NVML or a driver is absent."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(Device(i, "cuda", name, int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _fake(spec: str) -> list[Device]:
    body = spec[len("fake:"):]
    count_s, sep, mem_s = body.partition("x")
    try:
        count = int(count_s)
        memory = parse_memory(mem_s) if sep else DEFAULT_FAKE_MEMORY
    except ValueError:
        raise DeviceSpecError(f"bad fake device spec {spec!r}: use fake:N or fake:NxMEM, e.g. fake:4x16GiB") from None
    if count < 1:
        raise DeviceSpecError(f"bad fake device spec {spec!r}: N must be >= 1")
    return [Device(i, "fake", f"fake-{i}", memory) for i in range(count)]


def discover(spec: str = "all", *, nvml: Any = None) -> list[Device]:
    """Resolve a device spec into devices.

    ``all``: every NVML GPU, or the CPU when there is none. ``cpu``: the CPU. ``0,1``: those NVML GPUs.
    ``fake:N`` / ``fake:NxMEM``: N fake devices of MEM bytes each (16 GiB by default).

    Args:
        nvml: a callable returning the GPU list, for tests; defaults to reading NVML.

    Raises:
        DeviceSpecError: the spec cannot be parsed or names GPUs that are not there.
    """
    spec = (spec or "all").strip().lower()
    gpus_of = nvml or _nvml_gpus
    if spec == "cpu":
        return [_cpu()]
    if spec.startswith("fake:"):
        return _fake(spec)
    if spec == "all":
        return gpus_of() or [_cpu()]
    try:
        wanted = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise DeviceSpecError(f"unknown device spec {spec!r}: use all, cpu, 0,1 or fake:N[xMEM]") from None
    if not wanted or len(set(wanted)) != len(wanted):
        raise DeviceSpecError(f"bad device list {spec!r}: name each GPU index once")
    gpus = {gpu.index: gpu for gpu in gpus_of()}
    missing = [i for i in wanted if i not in gpus]
    if missing:
        have = ",".join(map(str, sorted(gpus))) or "none (NVML found no GPU)"
        raise DeviceSpecError(f"GPU index {missing} not present; this machine has: {have}")
    return [gpus[i] for i in wanted]


_current: Device | None = None


def current_device() -> Device:
    """The device of the device process this code runs in.

    Raises:
        NotInDeviceProcess: called outside a device process.
    """
    if _current is None:
        raise NotInDeviceProcess(
            "no device here: gpu.device is only set inside a celery-gpu device process (a task or setup hook)"
        )
    return _current


def set_current(device: Device | None) -> None:
    """Make ``device`` the one :func:`current_device` returns (the device process does it once, at start)."""
    global _current
    _current = device
