"""Real-GPU tests: run only where NVML sees a CUDA GPU and torch has CUDA (skipped elsewhere).

They start a real worker with ``--gpus all`` and check pinning, that tasks really run on the GPU, and that the
worker's main process maps no framework or CUDA runtime and holds no CUDA context (tests/gpu/cuda_free.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from celery_gpu.devices import discover
from tests.brokers import make
from tests.gpu.cuda_free import assert_cuda_free
from tests.worker import Worker

GPUS = [d for d in discover("all") if d.kind == "cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no CUDA GPU (NVML found none)"),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed"),
]
T = "tests.apps.basic."


def test_each_gpu_process_is_pinned_and_computes_on_its_gpu(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="all", per_device=2).start()
    try:
        w.wait_ready(timeout=180)
        results = [w.app.send_task(T + "cuda_info").get(timeout=120) for _ in range(8 * len(GPUS))]
        for r in results:
            assert r["device_count"] == 1, r  # the process sees exactly its own GPU
            assert r["tensor_device"] == "cuda:0"
        pinned = {(r["label"], r["cvd"]) for r in results}
        assert pinned <= {(g.label, str(g.index)) for g in GPUS}
        assert w.proc is not None
        assert_cuda_free(w.proc.pid, w.child_pids())
    finally:
        assert w.stop() == 0, w.log()


def test_batched_task_runs_whole_batches_on_the_gpu_and_nvml_reads(embedded_url: str, tmp_path: Path) -> None:
    import math

    w = Worker(make("embedded", embedded_url), tmp_path, devices="all", app_module="tests.apps.batched").start()
    try:
        w.wait_ready(timeout=180)
        items = [[float(i), 1.0, 2.0] for i in range(200)]
        sent = [w.app.send_task("tests.apps.batched.gpu_norms", args=[x]) for x in items]
        results = [r.get(timeout=120) for r in sent]
        for x, r in zip(items, results, strict=True):
            assert math.isclose(r["norm"], math.sqrt(sum(v * v for v in x)), rel_tol=1e-5)
            assert r["device"] == "cuda:0"
        assert max(r["batch"] for r in results) > 1, "items were batched"
        status = w.app.control.inspect([w.name], timeout=5)._request("gpu")[w.name]
        for d in status["devices"]:
            assert d["kind"] == "cuda"
            readings = d["readings"]
            assert readings["source"] in ("nvml", "none"), readings
            if readings["source"] == "nvml":
                assert readings["memory_total"] and readings["memory_used"] is not None
    finally:
        assert w.stop() == 0, w.log()


def test_pinned_staging_copies_correctly_and_is_timed_against_plain_to() -> None:
    import time

    import numpy as np
    import torch

    from celery_gpu.device.staging import to_device

    a = np.random.default_rng(0).random((64, 1024, 256), dtype=np.float32)  # 64 MiB
    for _ in range(2):
        to_device(a, "cuda:0")
        torch.from_numpy(a).to("cuda:0")
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {"pinned": [], "plain": []}
    for _ in range(5):
        t0 = time.perf_counter()
        staged = to_device(a, "cuda:0")
        torch.cuda.synchronize()
        times["pinned"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        plain = torch.from_numpy(a).to("cuda:0")
        torch.cuda.synchronize()
        times["plain"].append(time.perf_counter() - t0)
    assert torch.equal(staged, plain)
    print({k: f"{64 / 1024 / min(v):.2f} GB/s" for k, v in times.items()})  # measured, not asserted
