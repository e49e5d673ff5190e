"""Kept for users: ``from celery_gpu import faults`` in task code, for ``faults.hang()`` (a test task that hangs on
purpose) and the fake errors. Fault injection lives in :mod:`celery_gpu.device.faults`."""

from .device.faults import FAULTS_ENV, FakeCudaError, Faults, OutOfMemoryError, activate, hang

__all__ = ["FAULTS_ENV", "FakeCudaError", "Faults", "OutOfMemoryError", "activate", "hang"]
