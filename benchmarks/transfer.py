"""How fast does a task body get from the worker's main process into a device process?

Worker-internal hand-off only (the end-to-end part through a broker is not measured yet: see
benchmarks/README.md). A payload of N bytes goes from this process to a spawned child and a tiny answer comes
back; the time of that round trip is the hand-off. Three ways, one after the other, same child start-up:

1. ``shm``: celery-gpu's ``Channel`` as the pool uses it (``celery_gpu.frames``): the payload is written into a
   memfd segment shared with the child, the frame carries a reference, the child copies it out.
2. ``socket``: the same ``Channel`` with shared memory turned off: the payload goes through the socket.
3. ``pickle_pipe``: the usual Python way, a ``multiprocessing`` pipe of a spawned child: ``conn.send(payload)``
   (pickled) and ``conn.recv()``.

Reported per size: the median hand-off time of several repeats and GB/s (payload bytes / median time). The last
line printed is one JSON object (also written to ``--out``) with ``internal_gbps_64mib`` (shm) and
``internal_ratio_vs_pickle_pipe_64mib``.

Usage::

    python benchmarks/transfer.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from celery_gpu.frames import Channel  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
SIZES_FULL = (KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB)
SIZES_QUICK = (KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB)
MAX_FRAME = 1 << 30

CHILD = """
import socket, sys
from celery_gpu.frames import Channel
chan = Channel(socket.socket(fileno=int(sys.argv[1])), max_frame=1 << 30, shm_threshold=int(sys.argv[2]))
while True:
    try:
        msg = chan.read()
    except EOFError:
        break
    chan.write({"n": len(msg["body"])})
"""


def repeats_for(size: int, quick: bool) -> int:
    if size <= MiB:
        return 200 if not quick else 50
    return 10 if not quick else 5


def channel_path(shm: bool) -> Callable[[bytes, int], list[float]]:
    """Round trips through a ``Channel`` to a child running the device process's read loop."""

    def run(payload: bytes, repeats: int) -> list[float]:
        ours, theirs = socket.socketpair()
        threshold = 64 * KiB if shm else 1 << 62
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), str(threshold)],
                                pass_fds=[theirs.fileno()], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)])))
        theirs.close()
        chan = Channel(ours, max_frame=MAX_FRAME, shm_threshold=threshold)
        times = []
        try:
            chan.write({"t": "run", "body": payload[:16]})  # warm: the child is up, imports done
            chan.read()
            for _ in range(repeats + 1):
                started = time.perf_counter()
                chan.write({"t": "run", "body": payload})
                answer = chan.read()
                times.append(time.perf_counter() - started)
                assert answer == {"n": len(payload)}
        finally:
            chan.close()
            proc.wait(30)
        return times[1:]  # the first one maps and grows the segments

    return run


def _pipe_child(conn: Any) -> None:
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            break
        conn.send(len(payload))


def pickle_pipe(payload: bytes, repeats: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_child, args=(child,), daemon=True)
    proc.start()
    child.close()
    times = []
    try:
        parent.send(payload[:16])
        parent.recv()
        for _ in range(repeats + 1):
            started = time.perf_counter()
            parent.send(payload)
            assert parent.recv() == len(payload)
            times.append(time.perf_counter() - started)
    finally:
        parent.close()
        proc.join(30)
    return times[1:]


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 64 MiB, fewer repeats (under a minute)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line here")
    args = parser.parse_args(argv)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    paths: dict[str, Callable[[bytes, int], list[float]]] = {
        "shm": channel_path(shm=True), "socket": channel_path(shm=False), "pickle_pipe": pickle_pipe,
    }
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in paths}
    started = time.monotonic()
    for size in sizes:
        payload = os.urandom(size)
        for name, run in paths.items():
            times = run(payload, repeats_for(size, args.quick))
            median = statistics.median(times)
            table[name][human(size)] = {"median_ms": round(median * 1000, 4), "gbps": round(size / median / 1e9, 3)}
            print(f"{human(size):>8}  {name:<12} {median * 1000:10.3f} ms  {size / median / 1e9:8.3f} GB/s",
                  flush=True)
    key = human(64 * MiB)
    shm_gbps = table["shm"][key]["gbps"]
    result = {
        "benchmark": "transfer", "quick": args.quick, "part": "internal",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sizes": [human(s) for s in sizes], "paths": table,
        "internal_gbps_64mib": shm_gbps,
        "internal_ratio_vs_pickle_pipe_64mib": round(shm_gbps / table["pickle_pipe"][key]["gbps"], 2),
        "internal_ratio_vs_socket_64mib": round(shm_gbps / table["socket"][key]["gbps"], 2),
        "goal": {"internal_gbps_64mib": 5.0, "met": shm_gbps >= 5.0},
        "command": "python benchmarks/transfer.py" + (" --quick" if args.quick else ""),
        "total_s": round(time.monotonic() - started, 1),
    }
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
