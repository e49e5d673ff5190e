"""Real-GPU failure handling: a real out-of-memory error split in the same process, a real device-side assert
replacing the poisoned process (run only where a CUDA GPU and torch with CUDA are present)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from celery_gpu.devices import discover
from tests.brokers import make
from tests.chaos.conftest import ledger, start, task

GPUS = [d for d in discover("all") if d.kind == "cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no CUDA GPU (NVML found none)"),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed"),
]


def test_a_real_oom_is_split_in_the_same_process(embedded_url: str, tmp_path: Path) -> None:
    gpu = GPUS[0]
    gib = gpu.total_memory / 2**30 / 6  # 16 items want ~2.7x the GPU; 4 fit
    w = start(make("embedded", embedded_url), tmp_path, devices=str(gpu.index))
    try:
        results = task(w, "gpu_alloc", batch=16).submit_many(range(16), kwargs={"gib": gib})
        values = [r.get(timeout=300) for r in results.results]
        assert [v["item"] for v in values] == list(range(16))
        pids = {v["pid"] for v in values}
        assert len(pids) == 1, "split in the same process, never replaced"
        assert max(v["n"] for v in values) <= 5
        stats = w.pool_stats()
        assert stats is not None and stats["memory"]["batch_caps"], stats
        assert "ran out of memory" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_a_real_device_side_assert_replaces_the_process(embedded_url: str, tmp_path: Path) -> None:
    w = start(make("embedded", embedded_url), tmp_path, devices=str(GPUS[0].index))
    try:
        marker = tmp_path / "asserted"
        result = task(w, "gpu_assert_once").delay(str(marker)).get(timeout=300)
        poisoned = int(marker.read_text())
        assert result["pid"] != poisoned, "ran again in a fresh process"
        assert [e["pid"] for e in ledger(w)] == [poisoned, result["pid"]]
        assert "sticky CUDA error" in w.log()
    finally:
        assert w.stop() == 0, w.log()
