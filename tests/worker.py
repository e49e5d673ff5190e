"""Start a real ``celery worker`` process on the GPU pool for a test, and stop it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """A worker subprocess running ``app_module`` (``tests.apps.basic`` by default) on its own queue."""

    def __init__(self, broker: Any, tmp: Path, devices: str = "fake:4", per_device: int = 1,
                 extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (), cli: bool = False,
                 app_module: str = "tests.apps.basic", queue: str | None = None) -> None:
        self.app_module = app_module
        self.queue = queue or f"q-{uuid.uuid4().hex[:10]}"
        # A second worker on a queue (``queue=``) gets a name of its own.
        self.name = f"{self.queue}-{uuid.uuid4().hex[:4]}@test" if queue else f"{self.queue}@test"
        self.log_path = tmp / f"{self.name.split('@')[0]}.log"
        self.setup_log = tmp / f"{self.queue}.setup"
        self.env = dict(
            os.environ, TEST_BROKER=broker.broker_url, TEST_BACKEND=broker.backend_url, TEST_QUEUE=self.queue,
            TEST_SETUP_LOG=str(self.setup_log), CELERY_GPU_DEVICES=devices, CELERY_GPU_PER_DEVICE=str(per_device),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        )
        self.args = args
        self.cli = cli
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.app = self.client()

    def start(self) -> Worker:
        self._log = open(self.log_path, "wb")
        if self.cli:  # `celery-gpu worker --gpus ... --per-gpu ...`, the project's own command
            command = ["-m", "celery_gpu.cli", "worker", "-A", self.app_module,
                       "--gpus", self.env.pop("CELERY_GPU_DEVICES"), "--per-gpu", self.env.pop("CELERY_GPU_PER_DEVICE")]
        else:  # the stock `celery worker`: GPU(app) selects the pool
            command = ["-m", "celery", "-A", self.app_module, "worker"]
        self.proc = subprocess.Popen(
            [sys.executable, *command, "-l", "info", "-n", self.name,
             "-Q", self.queue, "--without-mingle", "--without-gossip", *self.args],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return self

    def client(self) -> Any:
        """A fresh client-side Celery app on this worker's broker, backend and queue."""
        from celery import Celery

        app = Celery(f"client-{self.queue}", broker=self.env["TEST_BROKER"], backend=self.env["TEST_BACKEND"],
                     set_as_current=False)
        app.conf.update(task_default_queue=self.queue, result_expires=3600)
        return app

    def wait_ready(self, app: Any = None, timeout: float = 60) -> dict[str, Any]:
        """Wait until every device process of the worker is up; returns the pool's stats."""
        app = app or self.app
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"worker died:\n{self.log()}"
            pool = self.pool_stats(app, timeout=0.5)
            if pool and all(s["state"] in ("idle", "busy", "failed")
                            for d in pool["devices"] for s in d["slots"]):
                return pool
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.log()}")

    def pool_stats(self, app: Any = None, timeout: float = 2.0) -> dict[str, Any] | None:
        stats = (app or self.app).control.inspect([self.name], timeout=timeout).stats() or {}
        return stats.get(self.name, {}).get("pool")

    def child_pids(self) -> list[int]:
        pool = self.pool_stats()
        assert pool is not None
        return [s["pid"] for d in pool["devices"] for s in d["slots"] if s["pid"]]

    def active_ids(self) -> set[str]:
        """Ids of the tasks ``celery inspect active`` reports for this worker."""
        active = self.app.control.inspect([self.name], timeout=1).active() or {}
        return {t["id"] for t in active.get(self.name, [])}

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        if self._log:
            self._log.close()
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def watch_events(app: Any, seconds: float = 30) -> dict[str, list[str]]:
    """Event types received per task id ("" for worker events), filled by a thread for ``seconds``; returns
    once the worker's heartbeat (every 2 s) shows that the receiver is consuming."""
    seen: dict[str, list[str]] = {}
    _listen(app, seconds, lambda e: seen.setdefault(e.get("uuid", ""), []).append(e["type"]))
    assert wait_until(lambda: "worker-heartbeat" in seen.get("", []), 15), seen
    return seen


def record_events(app: Any, seconds: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Whole events received per task id ("" for worker events) by Celery's own event receiver, filled by a
    thread for ``seconds``; returns once a worker heartbeat shows that the receiver is consuming."""
    seen: dict[str, list[dict[str, Any]]] = {}
    _listen(app, seconds, lambda e: seen.setdefault(e.get("uuid", ""), []).append(e))
    assert wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in seen.get("", [])), 15), seen
    return seen


def _listen(app: Any, seconds: float, handler: Any) -> None:
    import threading

    def listen() -> None:
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": handler})
            try:
                recv.capture(limit=None, timeout=seconds, wakeup=False)
            except Exception:
                pass

    threading.Thread(target=listen, daemon=True).start()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until(predicate: Any, timeout: float = 20, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
