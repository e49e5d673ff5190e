"""``celery-gpu status``: the table, the JSON, exit codes and the watch loop, with hand-made snapshots."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from celery_gpu.cli import main, status

GiB = 1024**3


def _device(label: str, **extra: Any) -> dict[str, Any]:
    device: dict[str, Any] = {
        "device": label, "name": "NVIDIA H100 80GB HBM3", "kind": "cuda", "total_memory": 80 * GiB,
        "reserved_memory": 2 * GiB, "quarantined": False, "reason": None,
        "readings": {"utilization": 0.87, "memory_used": int(12.5 * GiB), "memory_total": 80 * GiB,
                     "temperature_c": 64.0, "power_w": 412.5, "source": "nvml"},
        "slots": [{"slot": 0, "pid": 1234, "state": "busy", "task": "t-1", "tasks_done": 10, "restarts": 1},
                  {"slot": 1, "pid": 1235, "state": "idle", "task": None, "tasks_done": 2, "restarts": 0}],
        "counters": {"succeeded": 10, "failed": 2, "restarts": 1, "oom_splits": 0},
    }
    device.update(extra)
    return device


NULL_READINGS = {"utilization": None, "memory_used": None, "memory_total": None, "temperature_c": None,
                 "power_w": None, "source": "none"}


def _cluster() -> dict[str, dict[str, Any]]:
    gpu_box = {
        "hostname": "w1@gpu-a", "timestamp": 1732450000.0, "pending": 3,
        "devices": [
            _device("cuda:10"),
            _device("cuda:2", quarantined=True, reason="uncorrectable ECC error", readings=NULL_READINGS,
                    slots=[{"slot": 0, "pid": None, "state": "down", "task": None, "tasks_done": 0, "restarts": 3}],
                    counters={"succeeded": 0, "failed": 3, "restarts": 3, "oom_splits": 0}),
        ],
        "batching": {"proj.tasks.embed": {"batches": 5, "items": 300, "calls": 6, "mean_batch": 60.0, "waiting": 4}},
        "costs": {"proj.tasks.embed": {"items": 300, "device_s": 0.75, "energy_j": 150.0},
                  "proj.tasks.plain": {"items": 4, "device_s": 0.002, "energy_j": None}},
        "histograms": {},
    }
    cpu_box = {
        "hostname": "a1@cpu-box", "timestamp": 1732450000.0, "pending": 0,
        "devices": [_device("fake:0", name="fake", kind="fake", total_memory=8 * GiB, reserved_memory=GiB,
                            readings=dict(NULL_READINGS, source="simulated"),
                            slots=[{"slot": 0, "pid": 99, "state": "idle", "task": None, "tasks_done": 0,
                                    "restarts": 0}],
                            counters={"succeeded": 0, "failed": 0, "restarts": 0, "oom_splits": 0})],
        "batching": {}, "histograms": {},
    }
    return {"w1@gpu-a": gpu_box, "a1@cpu-box": cpu_box}


def _line(text: str, start: str) -> str:
    (found,) = [line for line in text.splitlines() if line.lstrip().startswith(start)]
    return found


def test_render_shows_every_worker_device_and_batch_within_80_columns() -> None:
    text = status.render(_cluster())
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    # workers by nodename, devices by label in natural order (cuda:2 before cuda:10)
    order = [lines.index(_line(text, key)) for key in ("a1@cpu-box", "fake:0", "w1@gpu-a", "cuda:2 ", "cuda:10")]
    assert order == sorted(order)
    assert "pending 3" in _line(text, "w1@gpu-a") and "1 up, 1 quarantined" in _line(text, "w1@gpu-a")
    assert _line(text, "cuda:10").split() == ["cuda:10", "H100", "80GB", "HBM3", "87%", "12.5/80.0", "64C", "412W",
                                              "2/2", "1", "12", "1"]
    assert "QUARANTINED: uncorrectable ECC error" in _line(text, "QUARANTINED")
    assert lines.index(_line(text, "QUARANTINED")) == lines.index(_line(text, "cuda:2 ")) + 1
    # null readings: "-", the memory celery-gpu reserved instead of the unknown use
    assert _line(text, "fake:0").split() == ["fake:0", "fake", "-", "1.0/8.0", "res", "-", "-", "1/1", "0", "0", "0"]
    assert _line(text, "cuda:2 ").split() == ["cuda:2", "H100", "80GB", "HBM3", "-", "2.0/80.0", "res", "-", "-",
                                              "0/1", "0", "3", "3"]
    # per task: what its items cost on the device (device time, energy where the device reports it)
    assert _line(text, "cost  proj.tasks.embed").split()[2:] == ["300", "items", "2.50", "ms/item", "0.50",
                                                                 "J/item"]
    assert _line(text, "cost  proj.tasks.plain").split()[2:] == ["4", "items", "0.50", "ms/item", "-", "J/item"]
    assert "res: memory reserved by celery-gpu" in text
    assert _line(text, "batch").split() == ["batch", "proj.tasks.embed", "mean", "batch", "60.0", "waiting", "4"]


def test_render_keeps_every_line_within_a_narrow_width() -> None:
    cluster = _cluster()
    cluster["w1@gpu-a"]["batching"]["proj." + "x" * 100] = {"mean_batch": 1.0, "waiting": 0}
    for width in (40, 60, 80, 120):
        assert all(len(line) <= width for line in status.render(cluster, width).splitlines())


def test_render_survives_missing_and_odd_fields() -> None:
    text = status.render({"w@h": {"devices": [{"device": "cuda:0", "readings": None, "slots": "?", "counters": 3}],
                                  "batching": {"t": None}}})
    assert _line(text, "cuda:0").split() == ["cuda:0", "-", "-", "-", "-", "-", "0/0", "0", "-", "-"]
    assert "pending -" in _line(text, "w@h")


def test_render_empty_cluster_says_so() -> None:
    assert status.render({}, timeout=1.5) == "no celery-gpu workers answered within 1.5s"


def test_render_lists_workers_without_celery_gpu() -> None:
    text = status.render({}, others={"old@h": {"error": "KeyError('gpu')"}})
    assert "old@h: not a celery-gpu worker" in text
    assert "error" not in status.render({}, others={"old@h": {"error": "No such command: gpu"}})
    assert "new@h: error RuntimeError('x')" in status.render({}, others={"new@h": {"error": "RuntimeError('x')"}})


class _Control:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def broadcast(self, command: str, **kwargs: Any) -> list[Any]:
        self.calls.append(dict(kwargs, command=command))
        return self.answers


class _App:
    def __init__(self, answers: list[Any]) -> None:
        self.control = _Control(answers)


def test_fetch_separates_snapshots_from_other_answers() -> None:
    cluster = _cluster()
    app = _App([{"w1@gpu-a": cluster["w1@gpu-a"]}, {"old@h": {"error": "KeyError('gpu')"}}, {"odd@h": [1, 2]},
                {"a1@cpu-box": cluster["a1@cpu-box"]}])
    replies = status.fetch(app, timeout=0.5, destination=["w1@gpu-a"])
    assert list(replies.workers) == ["a1@cpu-box", "w1@gpu-a"]
    assert replies.others == {"odd@h": [1, 2], "old@h": {"error": "KeyError('gpu')"}}
    assert app.control.calls == [{"command": "gpu", "reply": True, "timeout": 0.5, "destination": ["w1@gpu-a"]}]
    workers, others = status.fetch(_App([]))
    assert workers == {} and others == {}


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module holding a Celery app, found by ``-A`` the way ``celery -A`` finds it."""
    (tmp_path / "status_proj.py").write_text("from celery import Celery\napp = Celery('status_proj')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "status_proj", raising=False)
    return "status_proj"


def _fake_fetch(monkeypatch: pytest.MonkeyPatch, replies: status.Replies) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fetch(app: Any, timeout: float = 1.0, destination: list[str] | None = None) -> status.Replies:
        calls.append({"app": app.main, "timeout": timeout, "destination": destination})
        return replies

    monkeypatch.setattr(status, "fetch", fetch)
    return calls


def test_cli_json(app_module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = _cluster()
    calls = _fake_fetch(monkeypatch, status.Replies(cluster, {"old@h": {"error": "x"}}))
    assert main(["status", "-A", app_module, "--json", "--timeout", "2.5", "-d", "w1@gpu-a,a1@cpu-box", "-d", "x"]) == 0
    assert json.loads(capsys.readouterr().out) == {"workers": cluster,
                                                    "others": [{"node": "old@h", "reply": {"error": "x"}}]}
    assert calls == [{"app": "status_proj", "timeout": 2.5, "destination": ["w1@gpu-a", "a1@cpu-box", "x"]}]


def test_cli_exit_codes(app_module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_fetch(monkeypatch, status.Replies(_cluster(), {}))
    assert main(["status", "-A", app_module]) == 0
    assert "w1@gpu-a" in capsys.readouterr().out
    _fake_fetch(monkeypatch, status.Replies({}, {"old@h": {"error": "x"}}))
    assert main(["status", "-A", app_module]) == 1
    assert "no celery-gpu workers answered within 1s" in capsys.readouterr().out
    assert main(["status", "-A", app_module, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["workers"] == {}


def test_cli_usage_errors(app_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["status", "-A", "no_such_module_here"], ["status", "-A", app_module, "--timeout", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "cannot load the app" in capsys.readouterr().err


def test_cli_unreachable_broker(app_module: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    def fetch(app: Any, timeout: float = 1.0, destination: list[str] | None = None) -> status.Replies:
        raise ConnectionRefusedError("Connection refused")

    monkeypatch.setattr(status, "fetch", fetch)
    assert main(["status", "-A", app_module]) == 1
    assert "cannot reach the broker: Connection refused" in capsys.readouterr().out


def test_watch_redraws_until_ctrl_c(app_module: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    calls = _fake_fetch(monkeypatch, status.Replies(_cluster(), {}))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    assert main(["status", "-A", app_module, "--watch"]) == 0
    out = capsys.readouterr().out
    assert sleeps == [2.0, 2.0] and len(calls) == 2
    assert out.count("celery-gpu status  ") == 2 and out.count("w1@gpu-a") == 2
    assert "\x1b[" not in out  # not a terminal: no screen clearing

    sleeps.clear()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["status", "-A", app_module, "--watch", "0.5"]) == 0
    out = capsys.readouterr().out
    assert sleeps == [0.5, 0.5] and out.startswith("\x1b[H\x1b[2Jcelery-gpu status  ")


def test_cli_ready(app_module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--ready``: 0 only when every worker asked is ready; a worker of an older version (no ``ready`` field) is
    judged from its slots; a named worker that does not answer, or answers without celery-gpu, is not ready."""
    cluster = _cluster()
    starting = dict(cluster["w1@gpu-a"], ready=False, waiting_for=["cuda:10#1 starting"])
    _fake_fetch(monkeypatch, status.Replies({"w1@gpu-a": dict(cluster["w1@gpu-a"], ready=True, waiting_for=[])}, {}))
    assert main(["status", "-A", app_module, "--ready", "-d", "w1@gpu-a"]) == 0
    assert capsys.readouterr().out == "w1@gpu-a: ready\n"
    _fake_fetch(monkeypatch, status.Replies({"w1@gpu-a": starting}, {}))
    assert main(["status", "-A", app_module, "--ready"]) == 1
    assert capsys.readouterr().out == "w1@gpu-a: not ready: cuda:10#1 starting\n"
    old = {"hostname": "w1@gpu-a", "devices": [_device("cuda:0")]}  # no "ready": its slots (busy, idle) say it is
    _fake_fetch(monkeypatch, status.Replies({"w1@gpu-a": old}, {"plain@h": {"error": "KeyError('gpu')"}}))
    assert main(["status", "-A", app_module, "--ready", "-d", "w1@gpu-a", "-d", "gone@h", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ready"] is False
    assert verdict["workers"]["w1@gpu-a"] == {"ready": True, "waiting_for": []}
    assert verdict["workers"]["gone@h"]["waiting_for"] == ["no answer within 1s"]
    assert "not a celery-gpu worker" in verdict["workers"]["plain@h"]["waiting_for"][0]
    _fake_fetch(monkeypatch, status.Replies({}, {}))
    assert main(["status", "-A", app_module, "--ready"]) == 1
    assert "no celery-gpu worker answered" in capsys.readouterr().out
