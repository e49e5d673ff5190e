"""Kept for users: ``from celery_gpu.staging import to_device``. It lives in :mod:`celery_gpu.device.staging`
(it runs in device processes)."""

from .device.staging import to_device

__all__ = ["to_device"]
