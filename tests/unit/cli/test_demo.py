"""The demo's progress line (issue 16): it counts what the worker finished while the inputs are still sent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from celery_gpu.cli import demo


class _Result:
    def __init__(self, clock: list[int], at: int) -> None:
        self.clock, self.at = clock, at

    def ready(self) -> bool:
        return self.clock[0] >= self.at

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        return {"label": 0, "score": 1.0, "device": "cpu", "pid": 1, "batch": 1}


class _Classify:
    """submit_many of a worker that finishes each result two chunks after it was sent."""

    def __init__(self) -> None:
        self.clock = [0]

    def submit_many(self, items: list[Any]) -> Any:
        self.clock[0] += 1
        results = [_Result(self.clock, self.clock[0] + 2) for _ in items]
        return type("Sent", (), {"results": results})()


def test_progress_shows_sending_and_done_while_sending(capsys: pytest.CaptureFixture[str]) -> None:
    inputs = np.zeros((1000, 4), dtype=np.float32)
    results, _ = demo._classify_all(_Classify(), inputs)
    assert len(results) == 1000
    lines = capsys.readouterr().err.split("\r")
    sending = [line for line in lines if "sending" in line]
    assert sending, lines
    assert any("done 0/1000" not in line for line in sending), "done moves while the inputs are still sent"
    assert "sent 1000/1000, done 1000/1000" in lines[-1]
