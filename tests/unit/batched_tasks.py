"""Helpers shared by unit tests of batched tasks."""

from __future__ import annotations

import uuid
from typing import Any

from celery_gpu import GPU


def make_task(gpu: GPU, fn: Any, **options: Any) -> Any:
    """A batched task (batch 8) of ``fn`` under a fresh name."""
    return gpu.task(name=f"t.{uuid.uuid4().hex[:8]}", batch=8, **options)(fn)
