"""What does running a model through celery-gpu cost, next to the usual alternatives?

The same small-MLP inference (512 -> 2048 -> 2048 -> 512, float32, one thread per process, one 1x512 input
per item sent as a JSON list of floats, the output's sum returned) runs through four paths on one broker:

1. ``celery_gpu``: a ``celery -A ... worker`` with the celery-gpu pool on the ``cpu`` device, two device
   processes (``CELERY_GPU_DEVICES=cpu CELERY_GPU_PER_DEVICE=2``), the model built in ``@gpu.setup``.
2. ``plain_celery``: stock Celery prefork, ``--concurrency 2``, spawned children, the model built in a
   ``worker_process_init`` handler.
3. ``subprocess``: ``subprocess.run([python, "-c", ...])`` per item: import torch, build the model, run one input.
4. ``process``: a spawned ``multiprocessing.Process`` per item, doing the same.

For the Celery paths: throughput is N ``.delay`` calls sent as fast as possible and all their results
collected (items/s end to end, the client included), and latency is the p50 of M sequential
``.delay(x).get()`` round trips. For the naive paths every item is timed alone: items/s = 1 / mean time, p50 is
the median time. The last line printed is one JSON object (also written to ``--out``).

Usage::

    python benchmarks/overhead.py [--quick] [--broker redis://127.0.0.1:6379/10] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks._overhead_*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._overhead_model import SUBPROCESS_CODE, make_inputs, process_item  # noqa: E402

PATHS = ("celery_gpu", "plain_celery", "subprocess", "process")
DEVICE_PROCESSES = 2  # celery-gpu device processes, and prefork children
INPUT_POOL = 32  # distinct inputs, cycled through
READY_TIMEOUT = 180.0  # seconds for a worker to start and load the model in every process
RESULT_TIMEOUT = 300.0  # seconds to wait for the results of a throughput batch
STOP_TIMEOUT = 60.0  # seconds for a warm shutdown before SIGKILL
REL_TOLERANCE = 1e-4  # the paths must compute the same outputs


@dataclass(frozen=True)
class Sizes:
    """How many items each measurement uses."""

    items: int  # throughput batch of a Celery path
    sequential: int  # round trips for the p50 of a Celery path
    naive: int  # items timed one by one in a naive path
    warmup: int  # parallel warm-up items of a Celery path (after every input was seen once)

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        return cls(items=300, sequential=50, naive=3, warmup=50) if quick else cls(2000, 200, 8, 200)


@dataclass
class PathResult:
    """The figures of one path."""

    name: str
    items_per_s: float
    p50_ms: float
    note: str
    outputs: dict[int, float] = field(default_factory=dict)  # input index -> result, to check the paths agree
    ready_s: float | None = None  # Celery paths: worker start until every process answered
    stop_s: float | None = None  # Celery paths: SIGTERM until the worker exited
    left_behind: int | None = None  # Celery paths: processes still alive after the worker stopped


# -- processes -------------------------------------------------------------------------------------------


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


# -- Celery paths ------------------------------------------------------------------------------------------


def wait_result(result: Any, worker: Worker, deadline: float) -> Any:
    """``result.get()``, checking that the worker still runs and the deadline has not passed."""
    from celery.exceptions import TimeoutError as ResultTimeout

    while True:
        try:
            return result.get(timeout=1.0)
        except ResultTimeout:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result from {worker.hostname} in time:\n{worker.log_tail()}") from None


def wait_ready(app_module: ModuleType, worker: Worker) -> None:
    """Block until every one of the worker's ``DEVICE_PROCESSES`` processes has run a task."""
    deadline = time.monotonic() + READY_TIMEOUT
    seen: set[int] = set()
    while len(seen) < DEVICE_PROCESSES:
        batch = [app_module.whoami.delay(0.2) for _ in range(2 * DEVICE_PROCESSES)]
        seen |= {int(wait_result(r, worker, deadline)) for r in batch}
    worker.pids |= seen


def run_batch(task: Any, inputs: list[list[float]], count: int, worker: Worker) -> tuple[float, list[float]]:
    """Send ``count`` items with ``.delay`` as fast as possible, wait for all; (seconds, results)."""
    started = time.perf_counter()
    pending = [task.delay(inputs[i % len(inputs)]) for i in range(count)]
    deadline = time.monotonic() + RESULT_TIMEOUT
    values = [float(wait_result(r, worker, deadline)) for r in pending]
    return time.perf_counter() - started, values


def round_trips(task: Any, inputs: list[list[float]], count: int) -> list[float]:
    """Seconds of each of ``count`` sequential ``.delay(x).get()`` calls."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        task.delay(inputs[i % len(inputs)]).get(timeout=60)
        times.append(time.perf_counter() - started)
    return times


def check_outputs(name: str, values: list[float], expected: dict[int, float]) -> None:
    for i, value in enumerate(values):
        want = expected[i % len(expected)]
        if abs(value - want) > REL_TOLERANCE * max(1.0, abs(want)):
            raise RuntimeError(f"{name}: item {i} returned {value}, expected {want}")


def measure_celery(name: str, app_module: ModuleType, worker: Worker, inputs: list[list[float]],
                   sizes: Sizes, started: float) -> PathResult:
    """Readiness, warm-up, throughput and round-trip latency of one running worker."""
    print(f"  waiting for {DEVICE_PROCESSES} processes of {worker.hostname} ...", flush=True)
    wait_ready(app_module, worker)
    ready_s = time.monotonic() - started
    print(f"  ready after {ready_s:.1f}s; warming up", flush=True)
    _, first = run_batch(app_module.mlp, inputs, len(inputs), worker)  # every input once: the reference
    outputs = dict(enumerate(first))
    _, warm = run_batch(app_module.mlp, inputs, sizes.warmup, worker)
    check_outputs(name, warm, outputs)
    round_trips(app_module.mlp, inputs, 10)

    elapsed, values = run_batch(app_module.mlp, inputs, sizes.items, worker)
    check_outputs(name, values, outputs)
    times = round_trips(app_module.mlp, inputs, sizes.sequential)
    return PathResult(
        name, sizes.items / elapsed, 1000 * statistics.median(times),
        f"{sizes.items} items in {elapsed:.2f}s; p50 of {sizes.sequential} round trips",
        outputs=outputs, ready_s=ready_s,
    )


def celery_path(name: str, module_name: str, args: list[str], env: dict[str, str], inputs: list[list[float]],
                sizes: Sizes, log_dir: Path) -> PathResult:
    """Start a worker of ``module_name``, measure it, stop it, and count what it left behind."""
    app_module = importlib.import_module(module_name)
    app_module.app.control.purge()  # leftovers of an interrupted run on a shared broker
    started = time.monotonic()
    with celery_worker(module_name, name.replace("_", "-"), args, env, log_dir) as worker:
        result = measure_celery(name, app_module, worker, inputs, sizes, started)
        print(f"  stopping {worker.hostname}, pid {worker.proc.pid}, and its processes "
              f"{sorted(worker.pids | descendants(worker.proc.pid))}", flush=True)
    result.stop_s, result.left_behind = worker.stop_s, worker.left_behind
    return result


# -- naive paths ---------------------------------------------------------------------------------------------


def time_items(name: str, run_one: Callable[[list[float]], float], inputs: list[list[float]],
               count: int) -> PathResult:
    """Time ``run_one`` on ``count`` items, one after another."""
    times: list[float] = []
    outputs: dict[int, float] = {}
    for i in range(count):
        started = time.perf_counter()
        outputs[i] = run_one(inputs[i % len(inputs)])
        times.append(time.perf_counter() - started)
        print(f"  item {i + 1}/{count}: {times[-1]:.2f}s", flush=True)
    mean = statistics.fmean(times)
    return PathResult(name, 1 / mean, 1000 * statistics.median(times),
                      f"{count} items, {mean:.2f}s each on average", outputs=outputs)


def subprocess_item(env: dict[str, str]) -> Callable[[list[float]], float]:
    def run_one(x: list[float]) -> float:
        done = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE], input=json.dumps(x), capture_output=True,
                              text=True, check=True, cwd=REPO, env=env)
        return float(json.loads(done.stdout))

    return run_one


def spawned_process_item() -> Callable[[list[float]], float]:
    ctx = multiprocessing.get_context("spawn")

    def run_one(x: list[float]) -> float:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=process_item, args=(x, sender))
        proc.start()
        sender.close()
        try:
            value = float(receiver.recv())
        finally:
            receiver.close()
            proc.join()
        return value

    return run_one


# -- report --------------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    return urlunsplit(parts._replace(netloc=host))


def open_broker(stack: contextlib.ExitStack, url: str | None) -> tuple[str, str]:
    """``(url, how it is shown)`` of the benchmark's broker: ``url`` (password hidden), else an embedded Redis
    that lives as long as ``stack``."""
    if url:
        return url, redact(url)
    from celery_gpu.embedded import EmbeddedRedis

    return stack.enter_context(EmbeddedRedis()).url, "embedded-redis"


def emit(summary: dict[str, Any], out: Path | None) -> None:
    """Print the benchmark's final JSON line (the last line of its output), and write it to ``out`` too."""
    line = json.dumps(summary)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line)


def machine() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "celery": version("celery")}


def outputs_agree(results: dict[str, PathResult]) -> bool:
    reference = next(iter(results.values())).outputs
    return all(
        abs(value - reference[i]) <= REL_TOLERANCE * max(1.0, abs(reference[i]))
        for r in results.values() for i, value in r.outputs.items() if i in reference
    )


def report(results: dict[str, PathResult], sizes: Sizes, broker: str, quick: bool, command: str) -> dict[str, Any]:
    """Print the table and build the JSON summary."""
    print()
    print(f"{'path':<14} {'items/s':>10} {'p50 ms':>10}  notes")
    print("-" * 78)
    for r in results.values():
        extra = f"; ready in {r.ready_s:.1f}s, stopped in {r.stop_s:.1f}s" if r.ready_s and r.stop_s else ""
        print(f"{r.name:<14} {r.items_per_s:>10.2f} {r.p50_ms:>10.2f}  {r.note}{extra}")
    gpu = results.get("celery_gpu")

    def ratio(other: str) -> float | None:
        if gpu is None or other not in results:
            return None
        return round(gpu.items_per_s / results[other].items_per_s, 3)

    summary: dict[str, Any] = {
        "items_per_s": {p: round(results[p].items_per_s, 3) if p in results else None for p in PATHS},
        "p50_ms": {p: round(results[p].p50_ms, 3) if p in results else None for p in PATHS},
        "ratio_vs_plain_celery": ratio("plain_celery"),
        "ratio_vs_subprocess": ratio("subprocess"),
        "ratio_vs_process": ratio("process"),
        "items": sizes.items,
        "sequential_calls": sizes.sequential,
        "naive_items": sizes.naive,
        "ready_s": {p: round(r.ready_s, 2) for p, r in results.items() if r.ready_s is not None},
        "stop_s": {p: round(r.stop_s, 2) for p, r in results.items() if r.stop_s is not None},
        "left_behind": {p: r.left_behind for p, r in results.items() if r.left_behind is not None},
        "outputs_agree": outputs_agree(results),
        "broker": broker,
        "machine": machine(),
        "quick": quick,
        "command": command,
    }
    print()
    for other in ("plain_celery", "subprocess", "process"):
        if summary[f"ratio_vs_{other}"] is not None:
            print(f"celery_gpu throughput / {other}: {summary[f'ratio_vs_{other}']:.2f}x")
    print(f"outputs agree across paths: {summary['outputs_agree']}")
    return summary


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes (300 items, 50 round trips, 3 naive)")
    parser.add_argument("--broker", help="Redis URL to use (default: an embedded Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    return args


def run_paths(url: str, paths: list[str], sizes: Sizes) -> dict[str, PathResult]:
    os.environ["OVERHEAD_BROKER"] = url  # read by the app modules when they are imported below
    inputs = make_inputs(INPUT_POOL)
    results: dict[str, PathResult] = {}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        log_dir = Path(tmp)
        for name in paths:
            print(f"\n[{name}]", flush=True)
            if name == "celery_gpu":
                env = child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(DEVICE_PROCESSES))
                results[name] = celery_path(name, "benchmarks._overhead_gpu_app", [], env, inputs, sizes, log_dir)
            elif name == "plain_celery":
                args = ["--pool", "prefork", "--concurrency", str(DEVICE_PROCESSES)]
                results[name] = celery_path(name, "benchmarks._overhead_plain_app", args, child_env(url), inputs,
                                            sizes, log_dir)
            elif name == "subprocess":
                results[name] = time_items(name, subprocess_item(child_env(url)), inputs, sizes.naive)
            elif name == "process":
                results[name] = time_items(name, spawned_process_item(), inputs, sizes.naive)
    return results


def _exit_code(exc: BaseException) -> int:
    """Report ``exc`` and turn it into an exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, SystemExit):
        print(f"stopped ({exc.code})", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 1
    traceback.print_exception(exc)
    return 1


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: workers and the embedded Redis are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    shown = [redact(a) if "://" in a else a for a in (sys.argv[1:] if argv is None else argv)]
    command = shlex.join(["python", "benchmarks/overhead.py", *shown])
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        url, broker = open_broker(stack, args.broker)
        print(f"broker: {broker}; {os.cpu_count()} CPUs; sizes: {sizes}", flush=True)
        try:
            results = run_paths(url, paths, sizes)
        except BaseException as exc:
            code = _exit_code(exc)
        else:
            code = 0
        # The failure's frames, and the pending results they hold, are gone now, while Redis still runs: freed
        # after it stops, each result would make Celery's client retry its lost connection for many seconds.
        if code:
            return code
    summary = report(results, sizes, broker, args.quick, command)
    print(f"total time: {time.monotonic() - started:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
