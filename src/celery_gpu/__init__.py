"""celery-gpu: run Celery tasks on GPUs in long-lived, spawned, device-pinned processes.

``import celery_gpu`` loads the public API only (the client side: ``GPU``, task declaration, the arrays
serializer); the worker's main process (``celery_gpu.worker``) and the device processes (``celery_gpu.device``)
load their own code. docs/design.md has the picture of the layers.
"""

from .api import GPU
from .devices import Device, current_device, discover
from .errors import (
    AppNotImportable,
    BatchArgumentError,
    BatchResultMismatch,
    CeleryGPUError,
    DeviceSpecError,
    FrameError,
    InsufficientDeviceMemory,
    MalformedTaskMessage,
    ModelLoadError,
    NotInDeviceProcess,
    UnknownModel,
)
from .settings import Settings
from .tasks.batched import RetryItem
from .units import parse_memory

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
    "DeviceSpecError",
    "FrameError",
    "InsufficientDeviceMemory",
    "MalformedTaskMessage",
    "NotInDeviceProcess",
    "BatchArgumentError",
    "BatchResultMismatch",
    "ModelLoadError",
    "UnknownModel",
]
__version__ = "0.1.0"
