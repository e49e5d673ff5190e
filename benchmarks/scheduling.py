"""Deadlines and priorities inside batching, on a saturated celery-gpu worker.

One worker (``benchmarks._scheduling_app``: ``fake:1``, two device processes (``--per-device``), a batched task
``work`` of ``batch=8``, ``max_wait_ms=5``, whose call sleeps 20 ms + 0.1 ms per item: GPU-like, the time barely
grows with the batch). Every call logs the items it was given, so the benchmark counts every item that reached
the device.

1. **Deadlines.** N items submitted at once while every device process is busy for 0.5 s (a burst), 30 % of
   them with ``expires=0.3``: they expire while they wait, in the pool or in the broker. Reported: how many of
   the expiring items ended REVOKED, how many of *those* the function was called with (``expired_items_called``,
   the target is 0), that every live item was called exactly once, and the items per call against the same
   load with no expiring item (the baseline, first in the same run): expired items took no room in batches.
2. **Priorities.** Sequential round trips of high-priority items (``apply_async(priority=...).get()``), with the
   worker idle (the baseline) and while a feeder process (``benchmarks._scheduling_feed``) keeps the broker full
   of low-priority items (1,200/s, more than the worker serves; ``ignore_result``: nobody waits on them), in
   alternating rounds. ``high_priority_p99_ratio`` = loaded p99 / unloaded p99 (target: at most 2). Then the
   same loaded round trips on a worker whose pool ignores priorities (``gpu_priority_aging=0``: first come,
   first served; the broker still delivers by priority), for comparison. On Redis (the default, an embedded
   one) 0 is the most urgent priority and 9 the least, as kombu's priority lists serve them.

The last line printed is one JSON object (also written to ``--out``)::

    python benchmarks/scheduling.py [--quick] [--per-device 2] [--broker redis://127.0.0.1:6379/10] [--out out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.harness import (  # noqa: E402
    Worker,
    celery_worker,
    child_env,
    command_line,
    emit,
    exit_on_sigterm,
    machine,
    open_broker,
    percentile,
    run_guarded,
    source_after,
    source_state,
    wait_ready,
)

APP = "benchmarks._scheduling_app"
HIGH, LOW = 0, 9  # Redis: kombu serves priority 0 first
EXPIRING_SHARE = 0.3
EXPIRES_S = 0.3
BURST_S = 0.5  # the device processes are busy this long when a load of items arrives


def _sizes(quick: bool) -> dict[str, int]:
    return {"items": 1500 if quick else 4000, "round_trips": 100 if quick else 300, "rounds": 2 if quick else 3,
            "prefill": 3000 if quick else 6000}


def _called(log: Path) -> Counter[int]:
    """How many times each item reached the function."""
    calls: Counter[int] = Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            calls.update(json.loads(line)["items"])
    return calls


def _wait_settled(results: list[Any], worker: Worker, timeout: float = 300.0) -> list[str]:
    """The state of every result once none is pending any more."""
    deadline = time.monotonic() + timeout
    states = [r.state for r in results]
    while any(s == "PENDING" for s in states):
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"results still pending after {timeout:.0f}s:\n{worker.log_tail()}")
        time.sleep(0.2)
        states = [r.state if s == "PENDING" else s for r, s in zip(results, states, strict=True)]
    return states


def _load(app_module: Any, worker: Worker, log: Path, first: int, n: int, expiring: bool,
          processes: int) -> dict[str, Any]:
    """Submit ``n`` items at once (3 in 10 expiring after ``EXPIRES_S`` when ``expiring``); what became of them."""
    log.write_text("")
    # A burst: both device processes are busy for BURST_S when the items arrive, so they queue (in the pool, and
    # in the broker past the prefetch window); those that expire before their turn must never be called.
    busy = [app_module.whoami.delay(BURST_S) for _ in range(processes)]
    time.sleep(0.05)
    ids = list(range(first, first + n))
    doomed = {i for k, i in enumerate(ids) if expiring and k % 10 < EXPIRING_SHARE * 10}  # 3 in every 10
    started = time.monotonic()
    results: dict[int, Any] = {}
    for k in range(0, n, 100):  # in chunks, the expiring ones among the others
        chunk = ids[k:k + 100]
        live = [i for i in chunk if i not in doomed]
        for i, r in zip(live, app_module.work.submit_many(live).results, strict=True):
            results[i] = r
        short = [i for i in chunk if i in doomed]
        if short:
            for i, r in zip(short, app_module.work.submit_many(short, expires=EXPIRES_S).results, strict=True):
                results[i] = r
    states = dict(zip(ids, _wait_settled([results[i] for i in ids], worker), strict=True))
    for r in busy:
        r.get(timeout=60)
    took = time.monotonic() - started
    called = _called(log)
    revoked = {i for i in doomed if states[i] == "REVOKED"}
    live_ok = [i for i in ids if i not in doomed and states[i] == "SUCCESS" and called[i] == 1]
    return {
        "items": n, "expiring": len(doomed), "expired_revoked": len(revoked),
        "expiring_served_in_time": sum(states[i] == "SUCCESS" for i in doomed),
        "expired_items_called": sum(called[i] > 0 for i in revoked),
        "live_items": n - len(doomed), "live_items_called_once": len(live_ok),
        "other_states": dict(Counter(s for i, s in states.items() if s not in ("SUCCESS", "REVOKED"))),
        "calls": (calls := sum(1 for line in log.read_text().splitlines() if line.strip())),
        "items_per_call": round(sum(called.values()) / max(calls, 1), 2),
        "seconds": round(took, 3),
    }


def _round_trips(app_module: Any, count: int, first: int) -> list[float]:
    """Seconds of ``count`` sequential high-priority round trips. This client's own garbage collection waits
    until they are done (a full collection of its many result objects took 100-200 ms here: the client's pause,
    not the worker's)."""
    app_module.work.apply_async((first - 1,), priority=HIGH).get(timeout=60)  # not measured: connections, caches
    gc.collect()
    gc.disable()
    try:
        return _timed_round_trips(app_module, count, first)
    finally:
        gc.enable()


def _timed_round_trips(app_module: Any, count: int, first: int) -> list[float]:
    times = []
    for k in range(count):
        started = time.perf_counter()
        app_module.work.apply_async((first + k,), priority=HIGH).get(timeout=60)
        times.append(time.perf_counter() - started)
    return times


def _pool(app: Any, hostname: str) -> dict[str, Any]:
    replies = app.control.inspect([hostname], timeout=5.0).stats() or {}
    pool: dict[str, Any] = replies.get(hostname, {}).get("pool", {})
    return pool


def _saturation(app: Any, worker: Worker, queue: str) -> dict[str, Any]:
    """Items waiting in the worker's pool and messages waiting in the broker, now."""
    reply = app.control.broadcast("gpu", reply=True, timeout=5.0, destination=[worker.hostname])
    status = reply[0][worker.hostname] if reply else {}
    return {"pool_waiting": status.get("pending"), "broker_backlog": status.get("scaling", {}).get("queues", {})
            .get(queue)}


def _loaded(app_module: Any, worker: Worker, count: int, first: int, prefill: int,
            env: dict[str, str]) -> tuple[list[float], dict[str, Any]]:
    """``count`` high-priority round trips while the broker is kept full of low-priority items (a feeder process);
    the times, and how saturated the worker was at the start and the end."""
    # A backlog to begin with. The low-priority load is sent with ignore_result: Celery's Redis backend subscribes
    # a client to the result of every task it sends, and draining thousands of those would delay this client's
    # own round trips (measuring the client, not the worker).
    app_module.work.submit_many(range(40_000_000, 40_000_000 + prefill), priority=LOW, ignore_result=True)
    feeder = subprocess.Popen([sys.executable, "-m", "benchmarks._scheduling_feed", "20000000"], cwd=REPO,
                              env=env, stdin=subprocess.DEVNULL)  # more than the worker serves, in its own process
    queue = app_module.QUEUE
    try:
        time.sleep(1.0)  # the pool fills up
        before = _saturation(app_module.app, worker, queue)
        times = _round_trips(app_module, count, first)
        after = _saturation(app_module.app, worker, queue)
    finally:
        feeder.terminate()
        feeder.wait(30)
    app_module.app.control.purge()
    deadline = time.monotonic() + 120
    while _pool(app_module.app, worker.hostname).get("pending", 1) and time.monotonic() < deadline:
        time.sleep(0.5)
    return times, {"start": before, "end": after}


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 2)


def _priorities(app_module: Any, worker: Worker, sizes: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    """Unloaded and loaded round trips, in alternating rounds (a shared machine's slow moments hit both)."""
    idle: list[float] = []
    loaded: list[float] = []
    saturation = []
    per_round = sizes["round_trips"] // sizes["rounds"]
    for k in range(sizes["rounds"]):
        idle += _round_trips(app_module, per_round, 10_000_000 + k * per_round)
        times, seen = _loaded(app_module, worker, per_round, 30_000_000 + k * per_round, sizes["prefill"], env)
        loaded += times
        saturation.append(seen)
    return {
        "round_trips": len(idle), "rounds": sizes["rounds"], "unloaded_p50_ms": _ms(idle, 0.5),
        "unloaded_p95_ms": _ms(idle, 0.95), "unloaded_p99_ms": _ms(idle, 0.99), "loaded_p50_ms": _ms(loaded, 0.5),
        "loaded_p95_ms": _ms(loaded, 0.95), "loaded_p99_ms": _ms(loaded, 0.99), "saturation": saturation,
        "high_priority_p99_ratio": round(percentile(loaded, 0.99) / percentile(idle, 0.99), 3),
        "p95_ratio": round(percentile(loaded, 0.95) / percentile(idle, 0.95), 3),
        "p50_ratio": round(percentile(loaded, 0.5) / percentile(idle, 0.5), 3),
    }


def run(args: argparse.Namespace, broker: str, shown: str, tmp: Path) -> dict[str, Any]:
    sizes = _sizes(args.quick)
    log = tmp / "calls.jsonl"
    env = child_env(broker, CELERY_GPU_DEVICES="fake:1", CELERY_GPU_PER_DEVICE=str(args.per_device),
                    SCHED_CALL_LOG=str(log), CELERY_GPU_BACKLOG_INTERVAL="0.5")
    import importlib

    app_module = importlib.import_module(APP)
    app_module.app.conf.broker_url = app_module.app.conf.result_backend = broker
    app_module.app.control.purge()
    with celery_worker(APP, "scheduling", [], env, tmp) as worker:
        wait_ready(app_module, worker, args.per_device)
        print("  deadlines: baseline (no item expires) ...", flush=True)
        baseline = _load(app_module, worker, log, 0, sizes["items"], False, args.per_device)
        print(f"  deadlines: {EXPIRING_SHARE:.0%} of the items expire after {EXPIRES_S}s ...", flush=True)
        deadlines = _load(app_module, worker, log, 1_000_000, sizes["items"], True, args.per_device)
        print("  priorities: unloaded, then under a saturating low-priority load ...", flush=True)
        priorities = _priorities(app_module, worker, sizes, env)
        gc.collect()  # the results of this run are let go while the broker still runs
    print("  priorities: the same load on a worker whose pool serves first come first (gpu_priority_aging=0) ...",
          flush=True)
    with celery_worker(APP, "scheduling-fifo", [], {**env, "CELERY_GPU_PRIORITY_AGING": "0"}, tmp) as fifo:
        wait_ready(app_module, fifo, args.per_device)
        first_come, _ = _loaded(app_module, fifo, sizes["round_trips"] // sizes["rounds"], 50_000_000,
                                sizes["prefill"], env)
        gc.collect()
    priorities["fifo_pool_loaded_p50_ms"] = _ms(first_come, 0.5)
    priorities["fifo_pool_loaded_p99_ms"] = _ms(first_come, 0.99)
    priorities["loaded_p99_vs_fifo_pool"] = round(priorities["loaded_p99_ms"] / priorities["fifo_pool_loaded_p99_ms"],
                                                  3)
    deadlines["items_per_call_vs_baseline"] = round(deadlines["items_per_call"] / baseline["items_per_call"], 3)
    return {"baseline": baseline, "deadlines": deadlines, "priorities": priorities, "broker": shown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer items and round trips (about a minute)")
    parser.add_argument("--broker", help="a Redis URL for broker and results (default: an embedded Redis)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line here")
    parser.add_argument("--per-device", type=int, default=2, help="device processes on the fake device (default 2)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    source = source_state()
    with contextlib.ExitStack() as stack:
        broker, shown = open_broker(stack, args.broker)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scheduling-")))
        status, result = run_guarded(lambda: run(args, broker, shown, tmp))
    if result is None:
        return status
    targets = {"expired_items_called": result["deadlines"]["expired_items_called"],
               "high_priority_p99_ratio": result["priorities"]["high_priority_p99_ratio"]}
    summary = {
        "benchmark": "scheduling", "command": command_line("scheduling.py", argv), "quick": args.quick,
        "per_device": args.per_device,
        **targets,
        "targets_met": {"expired_items_called": targets["expired_items_called"] == 0,
                        "high_priority_p99_ratio": targets["high_priority_p99_ratio"] <= 2.0},
        **result, "machine": machine(), "source": source_after(source),
    }
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
