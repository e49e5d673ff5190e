"""Kept for users: ``worker_pool = "celery_gpu.pool:GPUPool"`` (the path before 0.2). The pool lives in
:mod:`celery_gpu.worker.pool`."""

from .worker.pool import GPUPool

__all__ = ["GPUPool"]
