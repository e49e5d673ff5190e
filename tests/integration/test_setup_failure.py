"""A failing ``@gpu.setup`` marks its device failed once, not in a loop; with every device failed the worker exits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.brokers import make
from tests.worker import Worker, wait_until

pytestmark = pytest.mark.broker
T = "tests.apps.basic."


def test_failed_setup_marks_device_failed_others_keep_working(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_SETUP_FAIL": "fake:1"}).start()
    app = w.app
    try:
        pool = w.wait_ready()
        assert [d["failed"] for d in pool["devices"]] == [False, True]
        devices = {app.send_task(T + "where", args=[i]).get(timeout=30)["device"] for i in range(20)}
        assert devices == {"fake:0"}
        lines = w.setup_log.read_text().splitlines()
        assert sum(line.endswith("fake:1") for line in lines) == 1, lines  # tried once, not looped
        assert "setup refused on fake:1" in w.log()
    finally:
        assert w.stop() == 0, w.log()


def test_worker_exits_when_every_device_fails(embedded_url: str, tmp_path: Path) -> None:
    w = Worker(make("embedded", embedded_url), tmp_path, devices="fake:2",
               extra_env={"TEST_SETUP_FAIL": "all"}).start()
    assert w.proc is not None
    assert wait_until(lambda: w.proc.poll() is not None, 60), w.log()  # type: ignore[union-attr]
    assert w.proc.returncode != 0
    assert "every device failed" in w.log()
