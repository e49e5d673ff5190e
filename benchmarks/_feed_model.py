"""The workloads of ``benchmarks/feed.py``: a no-op model (each item comes back as it went) and the anchor MLP of
``benchmarks/overhead.py`` (512 -> 2048 -> 2048 -> 512, float32, one torch thread on the CPU), on items of 1x512
float32, sent with the arrays serializer (a numpy array) or with JSON (the same values as a nested list).

torch is imported inside the functions only: the benchmark's driver stays light where it does not run the MLP.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks._overhead_model import build_model, make_inputs

#: Items per call of the batched tasks, and per step of the in-process loop.
BATCH = 64
#: How long the worker may hold an item back to fill a batch while its device processes are busy.
MAX_WAIT_MS = 5.0
#: The serializers of the items: celery-gpu's arrays serializer and JSON (kombu's names).
SERIALIZERS = {"arrays": "celery-gpu-arrays", "json": "json"}
MODELS = ("noop", "mlp")
#: Environment of the apps: broker URL, result backend URL, torch device of the plain worker and the client.
BROKER_ENV, BACKEND_ENV, DEVICE_ENV = "FEED_BROKER", "FEED_BACKEND", "FEED_DEVICE"
#: ``1``: the celery-gpu worker loads no MLP (only its no-op task is used; fake devices have no torch device).
NOOP_ONLY_ENV = "FEED_NOOP_ONLY"


def app_conf() -> dict[str, Any]:
    """Celery settings every app of the benchmark shares: both serializers accepted, results in the arrays
    serializer (one setting for every path, whatever the items were sent with), results kept 10 minutes."""
    accept = list(SERIALIZERS.values())
    return {"broker_connection_retry_on_startup": True, "result_expires": 600, "accept_content": accept,
            "result_accept_content": accept, "result_serializer": SERIALIZERS["arrays"]}


def torch_device() -> str:
    """The torch device of the plain worker's children and of the in-process loop (``FEED_DEVICE``)."""
    return os.environ.get(DEVICE_ENV) or "cpu"


def make_items(count: int, serializer: str) -> list[Any]:
    """``count`` distinct 1x512 float32 items: numpy arrays (arrays serializer) or nested lists (JSON)."""
    arrays = [np.asarray([x], dtype=np.float32) for x in make_inputs(count)]
    return arrays if serializer == "arrays" else [a.tolist() for a in arrays]


def as_matrix(xs: list[Any]) -> np.ndarray[Any, Any]:
    """Items (arrays or nested lists of 1x512) as one Bx512 float32 matrix (a fresh, writable one)."""
    if xs and isinstance(xs[0], np.ndarray):
        return np.concatenate(xs).astype(np.float32, copy=False)
    return np.asarray(xs, dtype=np.float32).reshape(len(xs), -1)


def load_mlp(device: str) -> Any:
    """The anchor MLP on ``device`` (``cpu``, ``cuda:0``), fixed weights; one torch thread on the CPU."""
    return build_model().to(device)


def mlp_batch(model: Any, device: str, xs: list[Any]) -> list[float]:
    """Many 1x512 items through the MLP in one call; the sum of each item's output."""
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(as_matrix(xs)).to(device))
    sums: list[float] = out.sum(dim=1).tolist()
    return sums


def noop_batch(xs: list[Any]) -> list[Any]:
    """The no-op model: every item back as it came."""
    return list(xs)


def reference_sums(items: list[Any]) -> list[float]:
    """The MLP's output sum of each item, computed here on the CPU (the outputs every path must return)."""
    return mlp_batch(load_mlp("cpu"), "cpu", items)


def check(name: str, model: str, values: list[Any], items: list[Any], sums: list[float], rel: float) -> None:
    """Item ``i`` of a run was ``items[i % len(items)]``: a no-op returns it, the MLP its reference sum."""
    if not values:
        raise RuntimeError(f"{name}: no results")
    for i, value in enumerate(values):
        if model == "noop":
            got = np.asarray(value, dtype=np.float32)
            want = np.asarray(items[i % len(items)], dtype=np.float32)
            if got.shape != want.shape or not np.array_equal(got, want):
                raise RuntimeError(f"{name}: item {i} came back changed ({got.shape}, expected {want.shape})")
        else:
            want_sum = sums[i % len(sums)]
            if abs(float(value) - want_sum) > rel * max(1.0, abs(want_sum)):
                raise RuntimeError(f"{name}: item {i} returned {value}, expected {want_sum}")
