"""Host → device staging on the CPU device (the CUDA path is in tests/gpu)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


def test_arrays_become_tensors_on_the_device_nested_too() -> None:
    import torch

    from celery_gpu.device.staging import to_device

    a = np.arange(12, dtype="<f4").reshape(3, 4)
    f = np.asfortranarray(np.ones((2, 3), dtype="i8"))
    out = to_device({"a": a, "more": [f, "text", 3], "t": torch.zeros(2)}, "cpu")
    assert isinstance(out["a"], torch.Tensor) and out["a"].device.type == "cpu"
    assert torch.equal(out["a"], torch.from_numpy(a)) and out["a"].dtype == torch.float32
    assert torch.equal(out["more"][0], torch.ones((2, 3), dtype=torch.int64))
    assert out["more"][1:] == ["text", 3]
    assert torch.equal(out["t"], torch.zeros(2))


def test_on_the_cpu_a_contiguous_array_is_not_copied() -> None:
    from celery_gpu.device.staging import to_device

    a = np.arange(8, dtype="<f8")
    t = to_device(a, "cpu")
    t[0] = 42.0
    assert a[0] == 42.0, "a view: the CPU device needs no copy"
