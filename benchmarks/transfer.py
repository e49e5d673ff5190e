"""How fast does a task body travel: inside the worker, and end to end through Redis?

Two parts (``--part internal|e2e|all``, default all); the last line printed is one JSON object (also written to
``--out``).

**internal**: the worker-internal hand-off only. A payload of N bytes goes from this process to a spawned child
and a tiny answer comes back; the time of that round trip is the hand-off. Three ways, one after the other, same
child start-up:

1. ``shm``: celery-gpu's ``Channel`` as the pool uses it (``celery_gpu.wire.frames``): the payload is written into a
   memfd segment shared with the child, the frame carries a reference, the child copies it out.
2. ``socket``: the same ``Channel`` with shared memory turned off: the payload goes through the socket.
3. ``pickle_pipe``: the usual Python way, a ``multiprocessing`` pipe of a spawned child: ``conn.send(payload)``
   (pickled) and ``conn.recv()``.

Reported per size: the median hand-off time of several repeats and GB/s (payload bytes / median time), as
``paths``; ``internal_gbps_64mib`` (shm), ``internal_ratio_vs_pickle_pipe_64mib`` and
``internal_ratio_vs_socket_64mib``.

**e2e**: a float32 numpy array of N bytes through a real broker and back. One celery-gpu worker
(``benchmarks._transfer_app``, ``CELERY_GPU_DEVICES=cpu CELERY_GPU_PER_DEVICE=1``) runs a task that reads about
1024 elements of its array and returns ``[nbytes, sampled sum]``; the client times sequential
``checksum.apply_async((arr,), serializer=...).get()`` round trips, the paths taking turns:

1. ``arrays``: celery-gpu's ``celery-gpu-arrays`` serializer (raw buffers beside msgpack; large payloads may go
   out of band through the claim-check, ``--claim-threshold``).
2. ``pickle``: Celery's own pickle serializer, **the baseline** (accepted by the benchmark app only).
3. ``json``: ``arr.tolist()`` sent as JSON (the ``tolist`` is timed too), up to 1 MiB only.

Reported per size and path: the median round trip and GB/s (array bytes / median), as ``e2e``;
``e2e_ratio_vs_pickle_64mib`` and ``e2e_ratio_vs_pickle_1kib`` (pickle median / arrays median). Every answer is
checked against the array sent: a wrong transfer fails the run.

Usage::

    python benchmarks/transfer.py [--quick] [--part internal|e2e|all] [--broker redis://127.0.0.1:6379/10]
                                  [--claim-threshold BYTES] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.harness import (  # noqa: E402
    RESULT_TIMEOUT,
    Worker,
    celery_worker,
    child_env,
    command_line,
    emit,
    exit_on_sigterm,
    machine,
    open_broker,
    print_loud_lines,
    run_guarded,
    source_after,
    source_state,
    version,
    wait_ready,
    wait_result,
)
from celery_gpu.wire.frames import Channel  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
SIZES_FULL = (KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB)
SIZES_QUICK = (KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB)
MAX_FRAME = 1 << 30
PARTS = ("internal", "e2e", "all")

# -- goals (on a 2-core machine, no GPU) ---------------------------------------------------------------------
GOAL_INTERNAL_GBPS_64MIB = 5.0  # shm hand-off at 64 MiB
GOAL_E2E_RATIO_64MIB = 3.0  # arrays end to end, at least 3x faster than pickle at 64 MiB
GOAL_E2E_RATIO_1KIB = 1.0  # and no slower than pickle at 1 KiB

# -- end to end ------------------------------------------------------------------------------------------------
E2E_APP = "benchmarks._transfer_app"
E2E_PATHS = ("arrays", "pickle", "json")
SERIALIZERS = {"arrays": "celery-gpu-arrays", "pickle": "pickle", "json": "json"}
JSON_MAX_SIZE = MiB  # beyond this, a JSON list of floats is pointless: reported as null
CLAIM_ENV = "CELERY_GPU_CLAIM_THRESHOLD"
E2E_WARM = 5  # round trips per path at 1 KiB before anything is timed (imports, connections, segments)
ENVELOPE_BYTES = 64 * KiB  # allowance for kombu's JSON envelope and Celery's headers around a body
CHECK_TOLERANCE = 1e-9  # relative: the sampled sum is computed from the same float32 values on both sides

CHILD = """
import socket, sys
from celery_gpu.wire.frames import Channel
chan = Channel(socket.socket(fileno=int(sys.argv[1])), max_frame=1 << 30, shm_threshold=int(sys.argv[2]),
               landing=True)  # as the device process reads
while True:
    try:
        msg = chan.read()
    except EOFError:
        break
    chan.write({"n": len(msg["body"])})
    del msg  # as the device process: the landing buffer is reused when nothing views it
"""


# -- internal: the hand-off from the worker's main process to a device process ----------------------------------


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


def run_internal(sizes: tuple[int, ...], quick: bool) -> dict[str, dict[str, dict[str, float]]]:
    """The internal table: path -> size -> median_ms, gbps."""
    paths: dict[str, Callable[[bytes, int], list[float]]] = {
        "shm": channel_path(shm=True), "socket": channel_path(shm=False), "pickle_pipe": pickle_pipe,
    }
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in paths}
    for size in sizes:
        payload = os.urandom(size)
        for name, run in paths.items():
            times = run(payload, repeats_for(size, quick))
            median = statistics.median(times)
            table[name][human(size)] = {"median_ms": round(median * 1000, 4), "gbps": round(size / median / 1e9, 3)}
            print(f"{human(size):>8}  {name:<12} {median * 1000:10.3f} ms  {size / median / 1e9:8.3f} GB/s",
                  flush=True)
    return table


# -- end to end: through the broker, the worker and back --------------------------------------------------------


def e2e_repeats(size: int, quick: bool) -> int:
    """Timed round trips per path at ``size`` (after one untimed one). ``--quick`` keeps 20 up to 64 KiB: a round
    trip there costs milliseconds, and the 1 KiB goal is a ratio near 1 that needs the noise low."""
    if size <= 64 * KiB:
        return 20
    if size <= MiB:
        return 10 if quick else 20
    if size <= 64 * MiB:
        return 3 if quick else 5
    return 3


def make_array(size: int) -> Any:
    """A float32 array of ``size`` bytes, values in [0, 1) (a fixed seed per size)."""
    import numpy as np

    return np.random.default_rng(size).random(size // 4, dtype=np.float32)


@dataclass
class E2EInfo:
    """What the e2e part saw besides its table."""

    redis: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ready_s: float | None = None
    stop_s: float | None = None
    left_behind: int | None = None
    loud_log_lines: int = 0


def redis_limits(app: Any) -> dict[str, int | None]:
    """The result backend's Redis: the largest value it takes, its memory limit and use (None when unknown, e.g.
    a managed Redis with ``CONFIG`` disabled)."""
    client = app.backend.client
    out: dict[str, int | None] = {}
    for name in ("proto-max-bulk-len", "client-query-buffer-limit", "maxmemory"):
        try:
            out[name] = int(client.config_get(name)[name])
        except Exception:
            out[name] = None
    try:
        out["used_memory"] = int(client.info("memory")["used_memory"])
    except Exception:
        out["used_memory"] = None
    return out


def mem_available() -> int | None:
    """``MemAvailable`` of this machine in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def skip_reason(size: int, limits: dict[str, int | None]) -> str | None:
    """Why a ``size`` payload cannot go through this Redis (or this machine), or None when it fits.

    On Redis, kombu sends every body base64-encoded inside a JSON envelope: one message of a ``size`` payload is
    about ``4/3 * size`` bytes in one Redis value (the pickle path always; the arrays path while it stays below
    the claim threshold)."""
    wire = -(-size // 3) * 4 + ENVELOPE_BYTES
    caps = [v for k, v in limits.items() if k in ("proto-max-bulk-len", "client-query-buffer-limit") and v]
    if caps and wire > min(caps):
        return (f"{human(size)}: a message is about {wire / 1e6:.0f} MB on the wire (base64), more than this Redis "
                f"takes in one value or command ({min(caps) / 1e6:.0f} MB: proto-max-bulk-len / "
                "client-query-buffer-limit)")
    maxmemory, used = limits.get("maxmemory"), limits.get("used_memory") or 0
    if maxmemory and used + 2 * wire > maxmemory:
        return (f"{human(size)}: two messages of about {wire / 1e6:.0f} MB each do not fit in this Redis's maxmemory "
                f"({maxmemory / 1e6:.0f} MB, {used / 1e6:.0f} MB used)")
    available = mem_available()
    if available is not None and 12 * size > available:  # client, worker, device process and Redis copies
        return f"{human(size)}: about {12 * size / 1e9:.1f} GB of memory needed, {available / 1e9:.1f} GB available"
    return None


def check_answer(path: str, size: int, value: Any, expected: list[float]) -> None:
    """The worker's ``[nbytes, sampled sum]`` must match the array sent."""
    ok = (isinstance(value, list) and len(value) == 2 and value[0] == expected[0]
          and abs(float(value[1]) - expected[1]) <= CHECK_TOLERANCE * max(1.0, abs(expected[1])))
    if not ok:
        raise RuntimeError(f"e2e {path} {human(size)}: the worker answered {value!r}, expected {expected!r}: "
                           "the array did not arrive intact")


def round_trip(task: Any, arr: Any, path: str, worker: Worker, expected: list[float]) -> float:
    """Seconds of one ``apply_async(...).get()`` of ``arr`` on ``path``; the answer is checked (untimed)."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    started = time.perf_counter()
    args = (arr.tolist(),) if path == "json" else (arr,)
    result = task.apply_async(args, serializer=SERIALIZERS[path])
    value = wait_result(result, worker, deadline)
    elapsed = time.perf_counter() - started
    check_answer(path, arr.nbytes, value, expected)
    return elapsed


def measure_e2e(task: Any, worker: Worker, sizes: tuple[int, ...], quick: bool, info: E2EInfo,
                ) -> dict[str, dict[str, dict[str, float] | None]]:
    """The e2e table: path -> size -> median_ms, gbps, repeats (None: not measured)."""
    from benchmarks._transfer_app import digest

    table: dict[str, dict[str, dict[str, float] | None]] = {p: {} for p in E2E_PATHS}
    warm = make_array(KiB)
    for path in E2E_PATHS:
        for _ in range(E2E_WARM):
            round_trip(task, warm, path, worker, digest(warm))
    for size in sizes:
        reason = skip_reason(size, info.redis)
        if reason is not None:
            print(f"  skipped {reason}", flush=True)
            info.notes.append(f"skipped {reason}")
            for path in E2E_PATHS:
                table[path][human(size)] = None
            continue
        arr = make_array(size)
        expected = digest(arr)
        paths = [p for p in E2E_PATHS if p != "json" or size <= JSON_MAX_SIZE]
        for path in E2E_PATHS:
            table[path][human(size)] = None
        for path in paths:
            round_trip(task, arr, path, worker, expected)  # untimed: the first of a size grows the segments
        repeats = e2e_repeats(size, quick)
        times: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(repeats):  # taking turns, the order rotating: slow moments hit every path alike
            for path in paths[i % len(paths):] + paths[:i % len(paths)]:
                times[path].append(round_trip(task, arr, path, worker, expected))
        for path in paths:
            median = statistics.median(times[path])
            table[path][human(size)] = {"median_ms": round(median * 1000, 3), "gbps": round(size / median / 1e9, 4),
                                        "repeats": repeats}
            print(f"{human(size):>8}  {path:<12} {median * 1000:10.3f} ms  {size / median / 1e9:8.4f} GB/s",
                  flush=True)
        del arr
    return table


def run_e2e(url: str, sizes: tuple[int, ...], quick: bool, claim_threshold: int,
            ) -> tuple[dict[str, dict[str, dict[str, float] | None]], E2EInfo]:
    """Start the worker, measure every size and path, stop it; the table and what else was seen."""
    os.environ["TRANSFER_BROKER"] = url  # read by the app module when it is imported below
    app_module = importlib.import_module(E2E_APP)
    app_module.app.control.purge()  # leftovers of an interrupted run on a shared broker
    info = E2EInfo(redis=redis_limits(app_module.app))
    print(f"  Redis: {info.redis}", flush=True)
    env = child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE="1", TRANSFER_BROKER=url,
                    **{CLAIM_ENV: str(claim_threshold)})
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Celery refuses to run as root while it accepts pickle. Pickle is this benchmark's baseline, on a queue
        # of its own; the override is for this worker only, never for an app that takes others' messages.
        env["C_FORCE_ROOT"] = "1"
        info.notes.append("running as root: the worker got C_FORCE_ROOT=1 (it accepts pickle, the baseline)")
    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        started = time.monotonic()
        with celery_worker(E2E_APP, "transfer-gpu", [], env, Path(tmp)) as worker:
            print(f"  waiting for the device process of {worker.hostname} ...", flush=True)
            wait_ready(app_module, worker, 1)
            info.ready_s = round(time.monotonic() - started, 2)
            print(f"  ready after {info.ready_s:.1f}s", flush=True)
            table = measure_e2e(app_module.checksum, worker, sizes, quick, info)
            print(f"  stopping {worker.hostname}", flush=True)
        info.stop_s = None if worker.stop_s is None else round(worker.stop_s, 2)
        info.left_behind = worker.left_behind
        info.loud_log_lines = print_loud_lines(worker)
    return table, info


# -- report ----------------------------------------------------------------------------------------------------


def human(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def e2e_ratio(table: dict[str, dict[str, dict[str, float] | None]] | None, size: int) -> float | None:
    """pickle median / arrays median at ``size``, or None when either was not measured."""
    if table is None:
        return None
    arrays, pickled = table["arrays"].get(human(size)), table["pickle"].get(human(size))
    if not arrays or not pickled:
        return None
    return round(pickled["median_ms"] / arrays["median_ms"], 3)


def goals(figures: dict[str, float | None]) -> dict[str, Any]:
    targets = {"internal_gbps_64mib": GOAL_INTERNAL_GBPS_64MIB, "e2e_ratio_vs_pickle_64mib": GOAL_E2E_RATIO_64MIB,
               "e2e_ratio_vs_pickle_1kib": GOAL_E2E_RATIO_1KIB}
    met: dict[str, bool | None] = {}
    for name, target in targets.items():
        value = figures[name]
        met[name] = None if value is None else value >= target
    return {**targets, "met": met, "all_met": all(met.values()) if None not in met.values() else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="sizes up to 64 MiB, fewer repeats (internal and e2e together under 2 minutes)")
    parser.add_argument("--part", choices=PARTS, default="all", help="which part to run (default: all)")
    parser.add_argument("--broker", help="Redis URL of the e2e part (default: an embedded Redis started here)")
    parser.add_argument("--claim-threshold", type=int, metavar="BYTES",
                        help=f"set {CLAIM_ENV} for the worker and this client (default: the environment's value, "
                             "else celery-gpu's default, 1 MiB)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line here")
    args = parser.parse_args(argv)
    if args.claim_threshold is not None and args.claim_threshold < 0:
        parser.error("--claim-threshold must be >= 0")
    return args


def claim_threshold(args: argparse.Namespace) -> int:
    """The threshold both sides use, put into this process's environment (the worker gets it from there too)."""
    if args.claim_threshold is not None:
        value = int(args.claim_threshold)
    elif os.environ.get(CLAIM_ENV):
        from celery_gpu.units import parse_memory

        value = parse_memory(os.environ[CLAIM_ENV])
    else:
        from celery_gpu.payload.claims import DEFAULT_THRESHOLD

        value = DEFAULT_THRESHOLD
    os.environ[CLAIM_ENV] = str(value)  # before the app and its serializers are imported
    return value


def internal_figures(internal: dict[str, dict[str, dict[str, float]]] | None,
                     e2e: dict[str, dict[str, dict[str, float] | None]] | None) -> dict[str, float | None]:
    """The headline figures: internal GB/s and ratios at 64 MiB, e2e ratios vs pickle at 64 MiB and 1 KiB."""

    def internal_ratio(other: str) -> float | None:
        if internal is None:
            return None
        return round(internal["shm"][human(64 * MiB)]["gbps"] / internal[other][human(64 * MiB)]["gbps"], 2)

    return {
        "internal_gbps_64mib": None if internal is None else internal["shm"][human(64 * MiB)]["gbps"],
        "internal_ratio_vs_pickle_pipe_64mib": internal_ratio("pickle_pipe"),
        "internal_ratio_vs_socket_64mib": internal_ratio("socket"),
        "e2e_ratio_vs_pickle_64mib": e2e_ratio(e2e, 64 * MiB),
        "e2e_ratio_vs_pickle_1kib": e2e_ratio(e2e, KiB),
    }


def summarize(args: argparse.Namespace, sizes: tuple[int, ...], figures: dict[str, float | None],
              internal: dict[str, dict[str, dict[str, float]]] | None,
              e2e: dict[str, dict[str, dict[str, float] | None]] | None, e2e_info: E2EInfo | None,
              threshold: int, source: dict[str, Any], broker: str | None, command: str,
              started: float) -> dict[str, Any]:
    """The final JSON object."""
    source = source_after(source)
    return {
        "benchmark": "transfer", "quick": args.quick, "part": args.part,
        "machine": {**machine(), "numpy": version("numpy"), "kombu": version("kombu")},
        "source": source,
        "sizes": [human(s) for s in sizes],
        "paths": internal,
        "e2e": e2e,
        **figures,
        "e2e_ratio_vs_pickle": None if e2e is None else {human(s): e2e_ratio(e2e, s) for s in sizes},
        "claim_threshold": threshold,
        "e2e_worker": None if e2e_info is None else {
            "ready_s": e2e_info.ready_s, "stop_s": e2e_info.stop_s, "left_behind": e2e_info.left_behind,
            "loud_log_lines": e2e_info.loud_log_lines},
        "redis": None if e2e_info is None else e2e_info.redis,
        "notes": [] if e2e_info is None else e2e_info.notes,
        "goal": goals(figures),
        "broker": broker,
        "command": command,
        "total_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = SIZES_QUICK if args.quick else SIZES_FULL
    command = command_line("transfer.py", argv)
    threshold = claim_threshold(args)
    started = time.monotonic()
    source = source_state()
    internal: dict[str, dict[str, dict[str, float]]] | None = None
    e2e: dict[str, dict[str, dict[str, float] | None]] | None = None
    e2e_info: E2EInfo | None = None
    broker: str | None = None
    if args.part in ("internal", "all"):
        print("[internal: main process -> device process]", flush=True)
        internal = run_internal(sizes, args.quick)
    if args.part in ("e2e", "all"):
        with contextlib.ExitStack() as stack:
            url, broker = open_broker(stack, args.broker)
            print(f"\n[e2e: client -> {broker} -> worker -> device process -> result; claim threshold "
                  f"{threshold} bytes]", flush=True)
            # As overhead.py: drop the failure's pending results while Redis still runs.
            code, measured = run_guarded(lambda: run_e2e(url, sizes, args.quick, threshold))
            if measured is None:
                return code
            e2e, e2e_info = measured
    figures = internal_figures(internal, e2e)
    result = summarize(args, sizes, figures, internal, e2e, e2e_info, threshold, source, broker, command, started)
    print()
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(f"goals met: {result['goal']['met']}; total time {result['total_s']:.1f}s")
    emit(result, args.out)
    if e2e_info is not None and e2e_info.left_behind:
        print(f"error: {e2e_info.left_behind} process(es) of the worker outlived it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
