"""Many models per device under a byte budget, on real workers: loads and evictions (least recently used, by
bytes) on a 10 GiB fake device with declared sizes, placement by affinity and torch models on the CPU device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import make
from tests.worker import Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.models."


def start(embedded_url: str, tmp: Path, devices: str, per_device: int = 1) -> Worker:
    w = Worker(make("embedded", embedded_url), tmp, devices=devices, per_device=per_device,
               app_module="tests.apps.models", extra_env={"TEST_MODEL_LOG": str(tmp / "loads.jsonl")}).start()
    try:
        w.wait_ready()
    except BaseException:
        w.stop()
        raise
    return w


def loads(w: Worker) -> list[dict[str, Any]]:
    path = Path(w.env["TEST_MODEL_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def use(w: Worker, model: str, x: int = 1) -> dict[str, Any]:
    """One call; returns once the pool has taken in its answer (a device process stores the result a moment
    before its done frame reaches the pool: the next call would find that process still busy)."""
    result: dict[str, Any] = w.app.send_task(f"{T}use_{model}", args=[x]).get(timeout=60)
    assert wait_until(lambda: not any(s["state"] == "busy" for d in (w.pool_stats() or {"devices": []})["devices"]
                                      for s in d["slots"]), 10), w.log()
    return result


def device_models(w: Worker, device: str) -> dict[str, Any]:
    status = w.app.control.broadcast("gpu", reply=True, timeout=2, destination=[w.name])[0][w.name]
    models: dict[str, Any] = next(d for d in status["devices"] if d["device"] == device)["models"]
    return models


@pytest.fixture
def fake_worker(embedded_url: str, tmp_path: Path) -> Iterator[Worker]:
    w = start(embedded_url, tmp_path, "fake:1x10GiB")
    yield w
    assert w.stop() == 0, w.log()


def test_lru_by_bytes_on_a_fake_device(fake_worker: Worker) -> None:
    w = fake_worker
    # a + b = 8 GiB; a used again; c (2 GiB) still fits the 10 GiB: all three stay (keeping 2 would evict b)
    seen = [use(w, m)["loaded"] for m in ("a", "b", "a", "c")]
    assert seen[-1] == ["b", "a", "c"], seen
    assert use(w, "d")["loaded"] == ["a", "c", "d"], "4 GiB more: the least recently used (b) goes"
    assert use(w, "c")["loaded"] == ["a", "d", "c"]
    # e (6 GiB): evicting a (4) is not enough, d goes too (keeping 3 would evict a only: 12 GiB on 10)
    assert use(w, "e")["loaded"] == ["c", "e"]
    assert [entry["model"] for entry in loads(w)] == ["a", "b", "c", "d", "e"], "a model in memory never reloads"
    models = device_models(w, "fake:0")
    assert {m: (v["loads"], v["evictions"]) for m, v in models.items()} == {
        "a": (1, 1), "b": (1, 1), "c": (1, 0), "d": (1, 1), "e": (1, 0)}
    resident = {m: v["resident_bytes"] for m, v in models.items() if v["resident_bytes"]}
    assert resident == {"c": 2 * 2**30, "e": 6 * 2**30}
    with pytest.raises(Exception, match="plus model 'huge'") as too_big:
        use(w, "huge")
    assert type(too_big.value).__name__ == "InsufficientDeviceMemory"
    with pytest.raises(Exception, match="uses model 'undeclared'") as unknown:
        w.app.send_task(f"{T}use_undeclared", args=[1]).get(timeout=30)
    assert type(unknown.value).__name__ == "UnknownModel"
    assert "evicts model d" in w.log()


def test_torch_models_on_the_cpu_device_with_affinity(embedded_url: str, tmp_path: Path) -> None:
    w = start(embedded_url, tmp_path, "cpu", per_device=2)
    try:
        first = use(w, "lin_a")
        again = use(w, "lin_a")
        # Without affinity the other process (idle longer) would take it and load lin_a a second time.
        assert again["pid"] == first["pid"] and again["x"] == 256
        holder = first["pid"]
        assert use(w, "lin_b")["pid"] == holder, "the other process would leave no room: 40 % + 40 % + 40 %"
        last = use(w, "lin_c")
        assert last["pid"] == holder and last["loaded"] == ["lin_b", "lin_c"], last
        assert [e["model"] for e in loads(w)] == ["lin_a", "lin_b", "lin_c"]
        measured = use(w, "lin_measured")
        assert "lin_measured" in measured["loaded"]
        models = device_models(w, "cpu")
        assert models["lin_a"]["evictions"] == 1 and models["lin_measured"]["resident_bytes"] > 0, models
    finally:
        assert w.stop() == 0, w.log()
