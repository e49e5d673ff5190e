"""``batching.py --profile``: py-spy samples of the worker's main process, its children and the client during a
throughput run, and the top functions of each (by own and by inclusive samples)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def profiled(targets: dict[str, int], out_dir: Path | None, prefix: str) -> Iterator[dict[str, Any]]:
    """Sample each ``{label: pid}`` with py-spy while inside (when ``out_dir`` is set): raw stacks to
    ``out_dir/<prefix>.<label>.raw.txt``; the yielded dict gets a summary per label once it exits."""
    summary: dict[str, Any] = {}
    if out_dir is None:
        yield summary
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}
    for label, pid in targets.items():
        out = out_dir / f"{prefix}.{label}.raw.txt"
        procs[label] = out, subprocess.Popen(
            [py_spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "--nonblocking", "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # attach before the measurement starts
    try:
        yield summary
    finally:
        for label, (out, proc) in procs.items():
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if out.exists():
                summary[label] = {**summarize_profile(out), "raw": str(out)}
            else:
                summary[label] = {"error": err.decode(errors="replace")[-500:]}


def summarize_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Top functions of a py-spy ``raw`` (collapsed stacks) file: by own samples and by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_short_frame(f) for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {"samples": total, "top_own_pct": shares(own), "top_inclusive_pct": shares(inclusive)}


def _short_frame(frame: str) -> str:
    """``"ack (kombu/transport/redis.py:123)"`` -> ``"ack (kombu/transport/redis.py)"``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name
