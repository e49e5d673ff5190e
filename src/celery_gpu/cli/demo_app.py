"""The demo's Celery app: a small MLP classifier, in torch when it is installed, else in NumPy.

The broker and result backend come from ``CELERY_GPU_DEMO_BROKER`` and ``CELERY_GPU_DEMO_BACKEND`` (set by
``celery-gpu demo``; the backend defaults to the broker's URL).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from celery import Celery

from ..api import GPU
from ..devices import Device

__all__ = ["app", "gpu", "classify", "LAYERS"]

_url = os.environ.get("CELERY_GPU_DEMO_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("celery_gpu_demo", broker=_url, backend=os.environ.get("CELERY_GPU_DEMO_BACKEND", _url))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
gpu = GPU(app)

#: Layer widths of the demo MLP: one 512-float input, ten class scores out.
LAYERS = (512, 1024, 1024, 10)


def _weights() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a), np.zeros(b, np.float32))
        for a, b in zip(LAYERS, LAYERS[1:], strict=False)
    ]


@gpu.setup
def load(device: Device) -> None:
    """Build the model once per device process, on its device."""
    try:
        import torch
    except ImportError:
        device.state["backend"], device.state["weights"] = "numpy", _weights()
        return
    if device.kind != "cuda":
        torch.set_num_threads(1)  # one process per slot shares the CPU with its siblings
    layers: list[Any] = []
    for w, b in _weights():
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear, torch.nn.ReLU()]
    device.state["backend"] = "torch"
    device.state["model"] = torch.nn.Sequential(*layers[:-1]).to(device.torch).eval()


@gpu.task(batch=64, max_wait_ms=5)
def classify(xs: list[list[float]]) -> list[dict[str, Any]]:
    """Classify 512-float inputs, one batched call for many tasks; per input: label, score, where it ran."""
    state = gpu.device.state
    if state["backend"] == "torch":
        import torch

        with torch.inference_mode():
            t = torch.tensor(xs, dtype=torch.float32, device=gpu.device.torch).reshape(len(xs), -1)
            scores = state["model"](t).float().cpu().numpy()
    else:
        h = np.asarray(xs, dtype=np.float32).reshape(len(xs), -1)
        for i, (w, b) in enumerate(state["weights"]):
            h = h @ w + b
            if i < len(state["weights"]) - 1:
                h = np.maximum(h, 0)
        scores = h
    labels = scores.argmax(axis=1)
    where = {"backend": state["backend"], "device": gpu.device.label, "pid": os.getpid(), "batch": len(xs)}
    return [{"label": int(k), "score": float(s[k]), **where} for k, s in zip(labels, scores, strict=True)]
