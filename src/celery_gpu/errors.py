"""Named errors: every failure a user can meet has its own type and a message that says what to do."""

from __future__ import annotations

__all__ = [
    "CeleryGPUError",
    "DeviceSpecError",
    "NotInDeviceProcess",
    "InsufficientDeviceMemory",
    "FrameError",
    "AppNotImportable",
    "MalformedTaskMessage",
    "BatchResultMismatch",
    "BatchArgumentError",
    "ArraySerializationError",
    "PayloadTooLarge",
    "ArrayDecodeError",
    "DeviceOutOfMemory",
    "TaskCrashedDevice",
    "FaultSpecError",
    "ClaimMissing",
    "ClaimCorrupt",
    "ClaimForged",
    "UnknownModel",
    "ModelLoadError",
]


class CeleryGPUError(Exception):
    """Base class of every error celery-gpu raises."""


class DeviceSpecError(CeleryGPUError, ValueError):
    """A device specification (``--gpus``) names devices that are not there or cannot be parsed."""


class NotInDeviceProcess(CeleryGPUError, RuntimeError):
    """``gpu.device`` was read outside a device process (e.g. in the worker's main process or a client)."""


class InsufficientDeviceMemory(CeleryGPUError):
    """A task declares more memory than any device of this worker has; it can never run here."""


class FrameError(CeleryGPUError):
    """A frame on a device-process pipe is malformed or larger than the configured maximum."""


class MalformedTaskMessage(CeleryGPUError):
    """A task message's body is not ``[args, kwargs, embed]``; it is discarded and its result set to this."""


class AppNotImportable(CeleryGPUError):
    """The device processes cannot find the Celery app by import; pass ``GPU(app, import_name=...)``."""


class BatchResultMismatch(CeleryGPUError):
    """A batched task's function returned a different number of results than it was given items."""


class BatchArgumentError(CeleryGPUError, TypeError):
    """A call of a batched task did not pass exactly one positional argument (its item)."""


class ArraySerializationError(CeleryGPUError, ValueError):
    """A value cannot be sent with the arrays serializer (its type, dtype or size); the message names where."""


class PayloadTooLarge(ArraySerializationError):
    """An encoded message would exceed the arrays serializer's maximum payload (``CELERY_GPU_MAX_PAYLOAD``)."""


class ArrayDecodeError(CeleryGPUError, ValueError):
    """A payload given to the arrays serializer is malformed or lies; kombu wraps it in its ``DecodeError``."""


class DeviceOutOfMemory(CeleryGPUError):
    """A single task (or batch item) does not fit in its device's memory even after the cache was freed."""


class TaskCrashedDevice(CeleryGPUError):
    """A task's device process died (crash, sticky CUDA error, frozen) on each of its allowed attempts.

    Not a ``WorkerLostError``: Celery requeues those forever under ``task_reject_on_worker_lost``; this one
    ends the task (and sends it to the dead-letter queue, when one is configured).
    """


class FaultSpecError(CeleryGPUError, ValueError):
    """``CELERY_GPU_FAULTS`` (fault injection for fake devices) cannot be parsed."""


class ClaimMissing(ArrayDecodeError, LookupError):
    """A stored payload is gone: never stored here, expired (TTL), or already consumed and deleted."""


class ClaimCorrupt(ArrayDecodeError):
    """A reference is malformed, or the stored payload does not match its size or SHA-256."""


class ClaimForged(ClaimCorrupt):
    """A reference names a key its store never makes (empty, a path, not 32 hex digits, another Redis key):
    forged, or from another store. Nothing is read or deleted."""


class UnknownModel(CeleryGPUError, LookupError):
    """A task names a model (``@gpu.task(model=...)``) that no ``@gpu.model`` declares."""


class ModelLoadError(CeleryGPUError):
    """A model's loader raised (or ran out of device memory even with every other model evicted)."""
