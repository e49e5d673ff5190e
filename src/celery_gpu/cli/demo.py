"""``celery-gpu demo``: start a broker (embedded Redis unless ``--broker``), a GPU worker, run a workload.

Prints a progress bar on stderr, a few results and the throughput on stdout; ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
from kombu.utils.url import maybe_sanitize_url

from ..devices import discover
from ..embedded import EmbeddedRedis
from ..errors import DeviceSpecError

__all__ = ["run"]


def _progress(sent: int, done: int, total: int, started: float) -> None:
    """One redrawn line: ``#`` done, ``-`` sent and waiting, ``.`` not sent yet; sending while not all are sent."""
    width = 30
    filled, queued = width * done // max(total, 1), width * sent // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-9)
    bar = "#" * filled + "-" * (queued - filled) + "." * (width - queued)
    phase = "sending" if sent < total else "sent"
    sys.stderr.write(f"\r[{bar}] {phase} {sent}/{total}, done {done}/{total}  {rate:8.1f} items/s")
    sys.stderr.flush()


def _collect_ready(pending: list[Any], results: list[dict[str, Any]]) -> None:
    """Take the results that are ready, in order, without waiting (one backend read per result taken)."""
    while len(results) < len(pending) and pending[len(results)].ready():
        results.append(pending[len(results)].get(timeout=300))


def _start_worker(gpus: str, per_gpu: int, log: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CELERY_GPU_DEVICES=gpus, CELERY_GPU_PER_DEVICE=str(per_gpu))
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "--quiet", "-A", "celery_gpu.cli.demo_app", "worker", "-l", "warning",
         "--without-mingle", "--without-gossip", "-n", f"demo-{os.getpid()}@%h"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: in-flight tasks finish, device processes exit
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_result(result: Any, worker: subprocess.Popen[bytes], timeout: float = 300) -> Any:
    """Wait for the first task (device processes load the model first); fail fast if the worker dies."""
    deadline = time.monotonic() + timeout
    while not result.ready():
        if worker.poll() is not None:
            raise SystemExit(f"celery-gpu demo: the worker exited with code {worker.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise SystemExit(f"celery-gpu demo: no result after {timeout}s; is the broker reachable?")
        time.sleep(0.05)
    return result.get()


def _classify_all(classify: Any, inputs: np.ndarray[Any, Any]) -> tuple[list[dict[str, Any]], float]:
    """Every input its own task (published in bulk), every result collected; the results and the seconds."""
    started = time.monotonic()
    pending: list[Any] = []
    results: list[dict[str, Any]] = []
    for start in range(0, len(inputs), 100):  # bulk publish; each input is still its own Celery task
        pending.extend(classify.submit_many([row.tolist() for row in inputs[start:start + 100]]).results)
        _collect_ready(pending, results)  # the worker runs while we send: count what it finished
        _progress(len(pending), len(results), len(inputs), started)
    for i, r in enumerate(pending[len(results):], len(results) + 1):
        results.append(r.get(timeout=300))
        if i % 50 == 0 or i == len(pending):
            _progress(len(pending), i, len(pending), started)
    seconds = time.monotonic() - started
    sys.stderr.write("\n")
    return results, seconds


def _report(results: list[dict[str, Any]], seconds: float) -> float:
    """A few results and the throughput on stdout; the mean batch size."""
    for i, res in enumerate(results[:5]):
        print(f"item {i}: label {res['label']} (score {res['score']:.3f}) on {res['device']} pid {res['pid']}")
    labels = np.bincount([r["label"] for r in results], minlength=10)
    mean_batch = float(sum(r["batch"] for r in results)) / max(len(results), 1)
    print(f"{len(results)} items in {seconds:.2f}s = {len(results) / seconds:.1f} items/s "
          f"(each a Celery task; mean batch {mean_batch:.1f}); label counts {labels.tolist()}")
    return mean_batch


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="celery-gpu demo")
    parser.add_argument("--broker", help="broker URL (default: an embedded Redis, no server needed)")
    parser.add_argument("--backend", help="result backend URL (default: the broker's URL; rpc:// for amqp)")
    parser.add_argument("--items", type=int, default=2000, help="inputs to classify (default 2000)")
    parser.add_argument("--gpus", default="all", help="devices for the worker (default: all, else the CPU)")
    parser.add_argument("--per-gpu", type=int, default=2, help="device processes per device (default 2)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args(argv)
    try:
        discover(args.gpus)
    except DeviceSpecError as exc:
        parser.error(str(exc))
    return args


def run(argv: list[str]) -> int:
    """Run the demo; returns the exit status."""
    args = _parse(argv)
    with ExitStack() as stack:
        url = args.broker or stack.enter_context(EmbeddedRedis()).url
        backend = args.backend or ("rpc://" if url.startswith(("amqp", "pyamqp")) else url)
        os.environ["CELERY_GPU_DEMO_BROKER"], os.environ["CELERY_GPU_DEMO_BACKEND"] = url, backend
        from .demo_app import app, classify  # reads the broker URL at import

        log = sys.stderr if not args.json else stack.enter_context(open(os.devnull, "wb"))
        worker = _start_worker(args.gpus, args.per_gpu, log)
        stack.callback(_stop_worker, worker)
        broker = "embedded-redis" if not args.broker else maybe_sanitize_url(url)
        print(f"broker: {'embedded Redis' if not args.broker else broker}; starting a worker...", file=sys.stderr)
        rng = np.random.default_rng(1)
        inputs = rng.standard_normal((args.items, 512), dtype=np.float32)
        first = _first_result(classify.delay(inputs[0].tolist()), worker)
        stats: dict[str, Any] = app.control.inspect(timeout=5).stats() or {}
        worker_stats: dict[str, Any] = next(iter(stats.values()), {})
        pool: dict[str, Any] = worker_stats.get("pool", {})
        devices = [d["device"] for d in pool.get("devices", [])]
        print(f"worker up: {len(pool.get('processes', []))} device process(es) on {', '.join(devices)}; "
              f"backend {first['backend']}", file=sys.stderr)
        results, seconds = _classify_all(classify, inputs)
        mean_batch = _report(results, seconds)
        summary = {
            "items": len(results), "seconds": round(seconds, 3), "items_per_s": round(len(results) / seconds, 1),
            "devices": devices, "device_processes": len(pool.get("processes", [])),
            "mean_batch": round(mean_batch, 2), "workload": f"{first['backend']}-mlp", "broker": broker,
        }
    if args.json:
        print(json.dumps(summary))
    return 0
