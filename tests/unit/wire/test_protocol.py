"""The protocol in one place: the frames its builders make (the bytes of 0.1, so a pool_restart onto new code keeps
working), what the main process reads from a device process (typed, defaulted), and the start-up description."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_gpu.devices import Device
from celery_gpu.errors import FrameError
from celery_gpu.wire import protocol


def test_builders_make_the_frames_of_the_wire_format() -> None:
    item = protocol.item("id-1", {"id": "id-1"}, memoryview(b"[[1], {}, {}]"), "application/json", "utf-8")
    assert item == {"uuid": "id-1", "request": {"id": "id-1"}, "body": b"[[1], {}, {}]",
                    "content_type": "application/json", "content_encoding": "utf-8"}
    assert protocol.run(3, "t.add", item) == {"t": "run", "job": 3, "name": "t.add", **item}
    assert protocol.batch_frame(4, "t.embed", [item]) == {"t": "batch", "job": 4, "name": "t.embed", "items": [item]}
    assert protocol.cancel(4, ["id-1"]) == {"t": "cancel", "job": 4, "uuids": ["id-1"]}
    assert protocol.stop() == {"t": "stop"}
    assert protocol.ready(99, 1.5, 10) == {"t": "ready", "pid": 99, "setup_s": 1.5, "mem": 10}
    assert protocol.heartbeat() == {"t": "hb"}
    outcome: protocol.Outcome = {"failed": False, "retval": "2", "runtime": 0.1}
    assert protocol.done(3, outcome, 5, None, 0) == {"t": "done", "job": 3, "mem": 5, "failed": False,
                                                      "retval": "2", "runtime": 0.1}
    assert protocol.done(3, outcome, 5, 64, 2)["peak"] == 64
    frame = protocol.batch_done(4, [outcome], 2, 5, 8, 1, 1)
    assert frame == {"t": "batch_done", "job": 4, "items": [outcome], "calls": 2, "mem": 5, "oom_splits": 1,
                     "fit": 1, "peak_per_item": 8}
    assert "fit" not in protocol.batch_done(4, [outcome], 1, 5, None, 0, 0)


@pytest.mark.parametrize("bad", [[1, 2], "ready", None, 7])
def test_what_is_not_a_map_is_a_frame_error(bad: Any) -> None:
    with pytest.raises(FrameError, match="expected a map"):
        protocol.read(bad)


def test_a_ready_frame_needs_a_pid() -> None:
    with pytest.raises(FrameError, match="pid"):
        protocol.read({"t": "ready"})
    assert protocol.read({"t": "ready", "pid": "12"}) == {"t": "ready", "pid": 12, "setup_s": 0.0, "mem": 0}


def test_an_unknown_kind_is_ignored() -> None:
    assert protocol.read({"t": "from-the-future", "x": 1}) is None
    assert protocol.read({}) is None


def test_reading_fills_every_field_a_confused_process_left_out() -> None:
    done = protocol.read({"t": "done", "failed": True, "exc": {"message": 5}})
    assert done == {"t": "done", "job": -1, "mem": 0, "failed": True, "runtime": 0.0,
                    "exc": {"kind": "error", "type": "Exception", "module": "builtins", "message": "5",
                            "requeue": False, "traceback": "", "internal": False, "repr": ""}}
    batch = protocol.read({"t": "batch_done", "job": 2, "items": "not a list", "calls": None})
    assert batch == {"t": "batch_done", "job": 2, "calls": 0, "mem": 0, "items": []}
    odd = protocol.read({"t": "batch_done", "job": 2, "items": [None, {"failed": False, "retval": "x"}]})
    assert odd is not None and odd["t"] == "batch_done"
    assert odd["items"] == [{"failed": False, "runtime": 0.0, "retval": None},
                            {"failed": False, "runtime": 0.0, "retval": "x"}]
    poisoned = protocol.read({"t": "poisoned", "error": "CUDA error"})
    assert poisoned == {"t": "poisoned", "error": "CUDA error", "traceback": ""}


def test_a_failure_kind_off_the_list_is_an_ordinary_error() -> None:
    done = protocol.read({"t": "done", "job": 1, "failed": True, "exc": {"kind": "explode", "type": "Retry"}})
    assert done is not None and done["t"] == "done"
    assert done["exc"]["kind"] == "error" and done["exc"]["type"] == "Retry"


def test_the_start_up_description_round_trips_with_the_keys_of_0_1() -> None:
    app = protocol.AppSpec("proj:app", ["proj.tasks"], ["/srv"], "gpu@host", 20, None)
    spec = protocol.StartSpec(app, Device(1, "fake", "fake-1", 1024), 0, 7, 1 << 20)
    text = spec.dumps()
    keys_01 = {"app", "modules", "sys_path", "hostname", "loglevel", "logfile", "fd", "device", "slot", "max_frame"}
    assert set(json.loads(text)) == keys_01 | {"threads"}  # 0.2 adds the CPU thread budget (issue 16)
    assert protocol.StartSpec.loads(text) == spec
    old = {k: v for k, v in json.loads(text).items() if k in keys_01}  # a pool of 0.1 starting this code
    assert protocol.StartSpec.loads(json.dumps(old)) == spec
    budgeted = protocol.StartSpec(app, Device(0, "cpu", "cpu", 1024), 1, 7, 1 << 20, threads=3)
    assert protocol.StartSpec.loads(budgeted.dumps()).threads == 3
