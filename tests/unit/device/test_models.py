"""Models in a device process: loaded on first use, kept while their bytes fit the budget, evicted least
recently used first *by bytes* — checked against an order that a count-based rule (keep N models) gets wrong."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from celery_gpu.device import context
from celery_gpu.device.models import ModelCache, lookup
from celery_gpu.devices import Device
from celery_gpu.errors import ModelLoadError, UnknownModel
from celery_gpu.models import ModelSpec, Resident

GiB = 1024**3
FAKE = Device(0, "fake", "fake-0", 10 * GiB)


def specs(loads: list[str], **sizes: float | None) -> dict[str, ModelSpec]:
    def loader(name: str) -> Any:
        def load(device: Device) -> Any:
            loads.append(name)
            return {"model": name, "device": device.label}

        return load

    return {n: ModelSpec(n, loader(n), None if s is None else int(s * GiB)) for n, s in sizes.items()}


def test_lru_by_bytes_keeps_what_fits_and_evicts_as_many_as_the_bytes_need() -> None:
    loads: list[str] = []
    cache = ModelCache(specs(loads, a=4, b=4, c=2, d=4, e=6), FAKE)
    for name in ("a", "b", "a", "c"):  # a and b (8 GiB), a used again, then c (2 GiB): 10 GiB fit 10 GiB
        cache.prepare(name, 10 * GiB)
    assert cache.resident.items() == [("b", 4 * GiB), ("a", 4 * GiB), ("c", 2 * GiB)]
    assert cache.take_events() == (["a", "b", "c"], []), "three models kept: a keep-2 rule evicts b here"
    cache.prepare("d", 10 * GiB)  # 4 GiB more: the least recently used, b, goes
    assert [n for n, _ in cache.resident.items()] == ["a", "c", "d"]
    cache.prepare("c", 10 * GiB)  # used again: a is now the least recently used, then d
    cache.prepare("e", 10 * GiB)  # 6 GiB: evicting a (4) is not enough, d goes too (a keep-3 rule evicts a only)
    assert cache.resident.items() == [("c", 2 * GiB), ("e", 6 * GiB)]
    assert cache.take_events() == (["d", "e"], ["b", "a", "d"])
    assert loads == ["a", "b", "c", "d", "e"], "each loaded once; a hit never reloads"


def test_a_smaller_budget_evicts_before_work_without_a_model() -> None:
    cache = ModelCache(specs([], a=4, b=4), FAKE)
    cache.prepare("a", 10 * GiB)
    cache.prepare("b", 10 * GiB)
    cache.prepare(None, 5 * GiB)  # work that declares 5 GiB of its own on this device: 5 GiB left for models
    assert [n for n, _ in cache.resident.items()] == ["b"]


def test_a_model_in_use_is_never_evicted_for_itself() -> None:
    cache = ModelCache(specs([], a=4, b=8), FAKE)
    cache.prepare("a", 10 * GiB)
    cache.prepare("b", 10 * GiB)
    assert [n for n, _ in cache.resident.items()] == ["b"]
    cache.prepare("b", 6 * GiB)  # over budget, but b is the one in use: it stays
    assert [n for n, _ in cache.resident.items()] == ["b"]


def test_an_undeclared_model_a_failing_loader_and_an_oom_while_loading() -> None:
    def broken(device: Device) -> Any:
        raise ValueError("no such checkpoint")

    tries: list[int] = []

    def oom_once(device: Device) -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "big"

    cache = ModelCache({"broken": ModelSpec("broken", broken, GiB), "big": ModelSpec("big", oom_once, 2 * GiB),
                        **specs([], a=1)}, FAKE)
    with pytest.raises(UnknownModel, match="no model 'nope'"):
        cache.get("nope")
    with pytest.raises(ModelLoadError, match="loading model 'broken' on fake:0 failed: ValueError"):
        cache.get("broken")
    cache.prepare("a", None)
    assert cache.get("big") == "big" and len(tries) == 2, "the other models were evicted, then it loaded"
    assert [n for n, _ in cache.resident.items()] == ["big"]


def test_undeclared_bytes_are_measured_with_torch_on_the_cpu_device() -> None:
    torch = pytest.importorskip("torch")

    def load(device: Device) -> Any:
        return torch.nn.Linear(2048, 2048).to(device.torch)  # 16 MiB of weights

    cache = ModelCache({"linear": ModelSpec("linear", load, None)}, Device(0, "cpu", "cpu", 64 * GiB))
    model = cache.get("linear")
    assert model(torch.ones(1, 2048)).shape == (1, 2048)
    ((name, size),) = cache.resident.items()
    assert name == "linear" and size >= 8 * 2**20, size


@pytest.fixture
def no_cache() -> Iterator[None]:
    saved = context.current().models
    context.current().models = None
    yield
    context.current().models = saved


def test_outside_a_device_process_a_model_loads_once_and_stays(no_cache: None) -> None:
    loads: list[str] = []
    declared = specs(loads, a=4)
    assert lookup(declared, "a") == {"model": "a", "device": "cpu"}
    assert lookup(declared, "a") is lookup(declared, "a")
    assert loads == ["a"]


def test_the_rule_alone() -> None:
    r = Resident([("a", 4), ("b", 4), ("c", 2)])
    assert r.to_evict(10) == [] and r.to_evict(10, need=1) == ["a"]
    assert r.to_evict(10, need=6) == ["a", "b"]
    assert r.to_evict(4, keep="a") == ["b", "c"]
    r.touch("a")
    assert r.to_evict(10, need=2) == ["b"]
