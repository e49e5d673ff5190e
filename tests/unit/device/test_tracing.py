"""Malformed bodies in a device process (issue 17, item 4): the task fails by name, stored where its client
looks, and the process goes on; in a batch only that item fails."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.device.batch import run_batch
from celery_gpu.device.context import DeviceContext
from celery_gpu.device.tracing import run_task
from celery_gpu.wire import protocol

BAD = [
    ([["x"], {}, "notadict"], "embed is str"),
    ([[1], "notadict", {}], "kwargs is str"),
    ([None, None, None], "args is NoneType"),
    ([[1], {}], "a list of 2 items"),
    ([[1], {}, {"callbacks": 5}], "callbacks"),
]


@pytest.fixture
def app() -> tuple[Celery, Any, Any]:
    app = Celery("tracing-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    gpu = GPU(app, devices="fake:1")

    @gpu.task(name="unit.plain")
    def plain(x: int) -> int:
        return x + 1

    @gpu.task(name="unit.batched", batch=8)
    def batched(items: list[int]) -> list[int]:
        return [x * 10 for x in items]

    return app, plain, batched


def _item(uuid: str, body: Any) -> protocol.Item:
    return protocol.item(uuid, {"id": uuid, "reply_to": None, "correlation_id": uuid},
                         json.dumps(body).encode(), "application/json", "utf-8")


@pytest.mark.parametrize(("body", "words"), BAD)
def test_a_malformed_plain_task_fails_by_name_and_is_stored(app: tuple[Celery, Any, Any], body: Any,
                                                            words: str) -> None:
    celery, plain, _ = app
    uuid = f"bad-{abs(hash(words))}"
    frame: Any = {"t": "run", "job": 1, "name": plain.name, **_item(uuid, body)}
    done = run_task(DeviceContext(), celery, frame, "unit@test")  # returns: the process is not harmed
    assert done["failed"] and done["exc"]["type"] == "MalformedTaskMessage" and words in done["exc"]["message"]
    stored = celery.AsyncResult(uuid)
    assert stored.state == "FAILURE" and type(stored.result).__name__ == "MalformedTaskMessage"
    assert words in str(stored.result)
    good: Any = {"t": "run", "job": 2, "name": plain.name, **_item("good-1", [[1], {}, {}])}
    assert run_task(DeviceContext(), celery, good, "unit@test")["retval"] == "2"


def test_a_malformed_item_fails_alone_in_its_batch(app: tuple[Celery, Any, Any]) -> None:
    celery, _, batched = app
    items = [_item(f"ok-{i}", [[i], {}, {}]) for i in range(3)]
    items[1:1] = [_item(f"bad-{i}", body) for i, (body, _) in enumerate(BAD)]
    frame: Any = {"t": "batch", "job": 7, "name": batched.name, "items": items}
    done = run_batch(DeviceContext(), celery, frame, "unit@test")
    outcomes = dict(zip([i["uuid"] for i in items], done["items"], strict=True))
    assert [outcomes[f"ok-{i}"]["retval"] for i in range(3)] == ["0", "10", "20"]
    for i, (_, words) in enumerate(BAD):
        bad = outcomes[f"bad-{i}"]
        assert bad["failed"] and bad["exc"]["type"] == "MalformedTaskMessage" and words in bad["exc"]["message"]
        assert celery.AsyncResult(f"bad-{i}").state == "FAILURE"
    assert done["calls"] == 1, "one call for the good items; none for the bad ones"


def test_a_body_celery_decoded_already_runs(app: tuple[Celery, Any, Any]) -> None:
    """A protocol-1 message reaches the pool decoded (no content type): it runs as it is, plain or batched."""
    celery, plain, batched = app
    item = protocol.item("p1-1", {"id": "p1-1"}, [[4], {}, None], None, None)  # type: ignore[arg-type]
    done = run_task(DeviceContext(), celery, {"t": "run", "job": 1, "name": plain.name, **item}, "unit@test")
    assert not done["failed"] and done["retval"] == "5", done
    items = [protocol.item(f"p1-b{i}", {"id": f"p1-b{i}"}, ([i], {}, None), None, None)  # type: ignore[arg-type]
             for i in range(2)]
    frame: Any = {"t": "batch", "job": 2, "name": batched.name, "items": items}
    assert [o["retval"] for o in run_batch(DeviceContext(), celery, frame, "unit@test")["items"]] == ["0", "10"]


def test_celery_shows_an_array_result_by_shape_and_dtype_in_a_device_process() -> None:
    import numpy as np
    from celery.utils.saferepr import saferepr

    from celery_gpu.device.tracing import brief_array_reprs

    value = np.zeros((1, 512), dtype=np.float32)
    assert saferepr(value, 1024).startswith("array(")  # numpy's own repr: every element, milliseconds
    brief_array_reprs()
    brief_array_reprs()  # once is enough; twice changes nothing
    assert saferepr(value, 1024) == "<ndarray shape=(1, 512) dtype=float32>"
    assert saferepr([value, {"k": value}, 3], 1024) == \
        "[<ndarray shape=(1, 512) dtype=float32>, {'k': <ndarray shape=(1, 512) dtype=float32>}, 3]"
    assert saferepr({"a": 1.5}, 1024) == "{'a': 1.5}"  # anything else as Celery shows it


def test_a_body_the_main_process_decoded_runs_plain_or_batched_and_a_bad_one_fails_by_name(
        app: tuple[Celery, Any, Any]) -> None:
    import msgpack

    celery, plain, batched = app

    def decoded(uuid: str, body: Any) -> protocol.Item:
        return protocol.item(uuid, {"id": uuid}, msgpack.packb(body), protocol.DECODED, "binary")

    done = run_task(DeviceContext(), celery, {"t": "run", "job": 1, "name": plain.name,
                                              **decoded("d-1", [[4], {}, None])}, "unit@test")
    assert not done["failed"] and done["retval"] == "5", done
    items = [decoded(f"d-b{i}", [[i], {}, {"callbacks": None}]) for i in range(2)] + [decoded("d-bad", [[1], {}])]
    frame: Any = {"t": "batch", "job": 2, "name": batched.name, "items": items}
    outcomes = run_batch(DeviceContext(), celery, frame, "unit@test")["items"]
    assert [o.get("retval") for o in outcomes[:2]] == ["0", "10"]
    assert outcomes[2]["failed"] and outcomes[2]["exc"]["type"] == "MalformedTaskMessage"
