"""Worker subprocesses: their environment, starting and stopping a ``celery worker``, its log, and the processes
it leaves behind (read from ``/proc``, so on Linux only)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.run import REPO

STOP_TIMEOUT = 60.0  # seconds for a warm shutdown before SIGKILL
# A worker logs at WARNING (its banner aside): any line with one of these is worth a look.
LOUD = ("WARNING", "ERROR", "CRITICAL", "Traceback")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process, from /proc (Linux); empty elsewhere."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ...
        table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _proc_table().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids in ``pids`` that still run (zombies do not count)."""
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def child_env(broker: str, **extra: str) -> dict[str, str]:
    """Environment of a worker or naive-path subprocess: the broker URL and the repo on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_GPU_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OVERHEAD_BROKER"] = broker
    env.update(extra)
    return env


@dataclass
class Worker:
    """A ``celery worker`` subprocess and the processes it started."""

    proc: subprocess.Popen[bytes]
    hostname: str
    log_path: Path
    pids: set[int] = field(default_factory=set)  # every process seen below the worker
    stop_s: float | None = None  # set by stop(): seconds from SIGTERM to the worker's exit
    left_behind: int | None = None  # set by stop(): processes still alive after the worker exited

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.hostname} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def loud_lines(self) -> list[str]:
        """The lines of the last 400 of its log that hold one of ``LOUD``."""
        return [line for line in self.log_tail(400).splitlines() if any(w in line for w in LOUD)]

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), SIGKILL after ``STOP_TIMEOUT``; then kill and count what outlived it."""
        self.pids |= descendants(self.proc.pid)
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"  {self.hostname}: no exit {STOP_TIMEOUT:.0f}s after SIGTERM, sending SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stop_s = time.monotonic() - started
        deadline = time.monotonic() + 10
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(self.pids)
        for pid in left:
            print(f"  {self.hostname}: process {pid} outlived the worker; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.left_behind = len(left)
        print(f"  {self.hostname} exited with {self.proc.returncode} {self.stop_s:.1f}s after SIGTERM; "
              f"processes left behind: {self.left_behind}", flush=True)


def print_loud_lines(worker: Worker) -> int:
    """Show the last of the worker's warning/error log lines, if any; how many there were."""
    logged = worker.loud_lines()
    if logged:
        print(f"  {worker.hostname} logged {len(logged)} warning/error line(s); the last ones:", flush=True)
        print("\n".join(f"    {line}" for line in logged[-10:]), flush=True)
    return len(logged)


@contextlib.contextmanager
def celery_worker(module: str, name: str, args: list[str], env: dict[str, str], log_dir: Path,
                  python: str = sys.executable) -> Iterator[Worker]:
    """Start ``python -m celery -A module worker`` (cwd = repo root; ``python`` is this interpreter unless given,
    e.g. another virtualenv's); always stop it on the way out."""
    hostname = f"{name}@{socket.gethostname()}"
    log_path = log_dir / f"{name}.log"
    cmd = [python, "-m", "celery", "-A", module, "worker", "--hostname", hostname, "--loglevel", "WARNING",
           "--without-gossip", "--without-mingle", "--without-heartbeat", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(proc, hostname, log_path)
    try:
        yield worker
    finally:
        worker.stop()
