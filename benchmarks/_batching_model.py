"""The batched form of the workload of ``benchmarks/overhead.py``, used by ``benchmarks/batching.py``.

The model and the inputs are those of :mod:`benchmarks._overhead_model`; here many 1x512 items go through the
model as one Bx512 tensor, and each item's output is summed on its own, so every item gets the value
:func:`benchmarks._overhead_model.infer` computes for it alone (within float32 rounding).
"""

from __future__ import annotations

import os
from typing import Any

#: Items per call of the batched task, and per loop step of the in-process path.
BATCH_SIZE = 64
#: How long the worker may hold an item back to fill a batch while its device processes are busy.
MAX_WAIT_MS = 5.0
#: Environment variable naming the Celery serializer of the benchmark's apps (``json`` by default).
SERIALIZER_ENV = "BENCH_SERIALIZER"


def serializer_conf() -> dict[str, Any]:
    """Celery settings that make tasks and results use the serializer named by ``BENCH_SERIALIZER``."""
    name = os.environ.get(SERIALIZER_ENV) or "json"
    return {"task_serializer": name, "result_serializer": name, "accept_content": [name]}


def infer_batch(model: Any, xs: list[list[float]]) -> list[float]:
    """Run ``len(xs)`` 1x512 inputs through ``model`` as one batch; the sum of each item's output."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor(xs, dtype=torch.float32))
    sums: list[float] = out.sum(dim=1).tolist()
    return sums
