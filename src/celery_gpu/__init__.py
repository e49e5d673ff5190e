"""celery-gpu: run Celery tasks on GPUs in long-lived, spawned, device-pinned processes."""

from .api import GPU
from .batch import RetryItem
from .devices import Device, current_device, discover, parse_memory
from .errors import (
    AppNotImportable,
    BatchArgumentError,
    BatchResultMismatch,
    CeleryGPUError,
    DeviceSetupFailed,
    DeviceSpecError,
    FrameError,
    InsufficientDeviceMemory,
    MalformedTaskMessage,
    NotInDeviceProcess,
)
from .settings import Settings

__all__ = [
    "GPU",
    "RetryItem",
    "Device",
    "Settings",
    "current_device",
    "discover",
    "parse_memory",
    "CeleryGPUError",
    "AppNotImportable",
    "DeviceSetupFailed",
    "DeviceSpecError",
    "FrameError",
    "InsufficientDeviceMemory",
    "MalformedTaskMessage",
    "NotInDeviceProcess",
    "BatchArgumentError",
    "BatchResultMismatch",
]
__version__ = "0.1.0"
