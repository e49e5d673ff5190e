"""Readiness (issue 16 item 8): one definition for ``celery-gpu status --ready``, ``/ready`` and systemd, and the
HTTP endpoint that serves it next to ``/metrics``."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from celery_gpu.observe.endpoint import Endpoint, start_endpoint
from celery_gpu.observe.health import notify_systemd, readiness


def _snap(*states: str, quarantined: bool = False, age: float = 0.0) -> dict[str, Any]:
    slots = [{"slot": i, "pid": 100 + i, "state": state} for i, state in enumerate(states)]
    snap = {"timestamp": time.time() - age, "devices": [
        {"device": "cuda:0", "quarantined": False, "reason": None, "slots": slots},
        {"device": "cuda:1", "quarantined": quarantined, "reason": "setup failed: RuntimeError: no weights",
         "slots": [{"slot": 0, "pid": None, "state": "failed" if quarantined else "idle"}]},
    ]}
    snap["ready"], snap["waiting_for"] = readiness(snap)
    return snap


def test_ready_only_when_every_device_process_takes_work() -> None:
    assert readiness(_snap("idle", "busy")) == (True, [])
    assert readiness(_snap("idle", "starting")) == (False, ["cuda:0#1 starting"])
    assert readiness(_snap("recycling", "down")) == (False, ["cuda:0#0 recycling", "cuda:0#1 down"])
    assert readiness(_snap("idle", quarantined=True)) == (False, ["cuda:1 failed: setup failed: RuntimeError: "
                                                                  "no weights"])
    assert readiness(_snap("idle"), consumer_ready=False).ready is False
    assert readiness(None) == (False, ["the pool has not started"])
    assert readiness({"devices": []}) == (False, ["no device processes"])
    assert readiness({"devices": "garbage from another version"}).ready is False


@pytest.fixture
def served() -> Iterator[tuple[list[Any], int]]:
    """An endpoint on a free port serving the snapshot in ``box[0]``."""
    box: list[Any] = [None]
    endpoint: Endpoint = start_endpoint(0, lambda: box[0], addr="127.0.0.1", stale_after=10)
    yield box, endpoint.port
    endpoint.stop()


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ready_and_health_endpoints_follow_the_snapshot(served: tuple[list[Any], int]) -> None:
    box, port = served
    assert _get(port, "/ready") == (503, {"ready": False, "waiting_for": ["the pool has not started"]})
    assert _get(port, "/health")[0] == 503
    box[0] = _snap("idle", "starting")
    assert _get(port, "/ready") == (503, {"ready": False, "waiting_for": ["cuda:0#1 starting"]})
    assert _get(port, "/health")[0] == 200
    box[0] = _snap("idle", "busy")
    assert _get(port, "/ready") == (200, {"ready": True, "waiting_for": []})
    box[0] = _snap("idle", "busy", age=60)  # the pool's loop stopped publishing: stuck
    status, body = _get(port, "/ready")
    assert status == 503 and "stuck" in body["waiting_for"][-1]
    assert _get(port, "/health")[0] == 503


def test_systemd_is_told_through_its_notification_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    assert notify_systemd("READY=1") is False  # not under systemd: nothing to do
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify_systemd("READY=1\nSTATUS=2 device process(es) take work") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=2 device process(es) take work"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify_systemd("STOPPING=1") is False  # a warning, never an error
