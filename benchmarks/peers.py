"""celery-gpu next to what users would otherwise use, side by side, in one run on one machine.

The anchor workload of ``benchmarks/overhead.py`` and ``benchmarks/batching.py`` (MLP 512 -> 2048 -> 2048 -> 512,
float32, ``torch.set_num_threads(1)`` in every process that runs it, one 1x512 item per request sent as a list of
floats, one float back: the sum of the output) through these paths, with two model processes (or replicas)
each, and a batch of 64 with a 5 ms wait wherever the tool batches:

1. ``celery_gpu_bulk``: a celery-gpu worker (``CELERY_GPU_DEVICES=cpu CELERY_GPU_PER_DEVICE=2``), the batched task
   ``@gpu.task(batch=64, max_wait_ms=5)`` of ``benchmarks._batching_gpu_app``, items sent with ``submit_many``.
2. ``celery_gpu_delay``: the same worker and task, one ``.delay(x)`` per item.
3. ``celery_batches``: Celery 5.6 (celery-batches needs Celery < 5.7) with a ``celery_batches.Batches`` task
   (``flush_every=64``, ``flush_interval`` 5 ms; ``benchmarks._peers_batches_app``), prefork pool, 2 children,
   prefetch multiplier 128, in a virtualenv of its own; the client is this process (Celery 5.7).
4. ``ray_serve``: Ray Serve, ``@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)``, 2 replicas of one
   CPU each, in a virtualenv of its own, driven through a ``DeploymentHandle`` by a client script in that
   virtualenv (``benchmarks._peers_ray``), which also starts the local Ray cluster.
5. ``plain_celery``: stock Celery 5.7 prefork, 2 spawned children, the model built once per child
   (``benchmarks._overhead_plain_app``).
6. ``subprocess`` and ``process``: a fresh interpreter (or a spawned ``multiprocessing.Process``) per item that
   imports torch, builds the model and runs one input (``overhead.py``'s naive paths), on a few items only.

Every worker (and the Ray cluster) is started and warmed up first; they stay up together, and one path is busy at
a time. Per path:

- ``items_per_s``: N items (2000; 500 with ``--quick``) sent as fast as the client can and all awaited (a closed
  loop with all N in flight, the client on the same machine), in rounds (3; 2 with ``--quick``) whose path order
  rotates, so a slow moment of the shared machine hits every path alike; the median round counts.
- ``p50_ms`` / ``p99_ms`` at a fixed moderate load: an open loop, item ``i`` sent at ``i / rate`` whatever has come
  back, the latency counted from that scheduled time to the result's arrival at the client. The same ``rate``
  for every path: half of the slowest batching path's throughput in this run (``--rate`` overrides it), in
  segments that take turns like the rounds.
- ``rss_mb``: the sum of the resident memory of the worker's process tree after warm-up (for Ray: every process
  of the local cluster, the client excluded), with ``pss_mb`` (shared pages split among the processes sharing
  them) and a breakdown per kind of process.
- ``cpu_ms_per_item`` of the throughput runs (worker tree, client, broker) and ``idle_cpu_pct`` of each worker
  while the others ran nothing.

Every output is checked against the reference computed here (relative tolerance 1e-4): a mismatch fails the
run. A peer whose virtualenv cannot be built (no network, say) or whose worker does not start is reported in
``skipped`` with the reason, and the run goes on. The last line printed is one JSON object (also written to
``--out``), with ``ratio_vs_celery_batches``, ``ratio_vs_ray_serve`` and ``ratio_vs_plain_celery``:
``celery_gpu_bulk`` items/s over each.

Usage::

    python benchmarks/peers.py [--quick] [--broker redis://127.0.0.1:6379/8] [--out results.json]
                               [--paths celery_gpu_bulk,celery_batches,ray_serve] [--rate 150]
                               [--venv-dir DIR] [--prepare]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks import batching, overhead  # noqa: E402
from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, SERIALIZER_ENV, serializer_conf  # noqa: E402
from benchmarks._overhead_model import build_model, infer, make_inputs  # noqa: E402

PATHS = ("celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve", "plain_celery", "subprocess",
         "process")
BATCHING_PATHS = ("celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve")
LOOP_PATHS = ("celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve", "plain_celery")
NAIVE_PATHS = ("subprocess", "process")
PROCESSES = 2  # model processes of every worker: device processes, prefork children, Ray replicas
INPUT_POOL = 32  # distinct inputs, cycled through
LOAD_FRACTION = 0.5  # the open loop's rate: this share of the slowest batching path's items/s
GPU_APP = "benchmarks._batching_gpu_app"
PLAIN_APP = "benchmarks._overhead_plain_app"
BATCHES_APP = "benchmarks._peers_batches_app"
# The celery-batches worker's queue and task names: the same as QUEUE / MLP_TASK / WHOAMI_TASK of
# benchmarks/_peers_batches_app.py (which this process cannot import: it needs celery-batches, hence Celery < 5.7).
BATCHES_QUEUE = "peers-celery-batches"
BATCHES_MLP = "peers_batches.mlp"
BATCHES_WHOAMI = "peers_batches.whoami"
BATCHES_STATS_KEY = "peers-celery-batches-stats"
BATCHES_PREFETCH = 128  # worker_prefetch_multiplier: 2 children x 128 = 2 full batches per child
RAY_MAX_ONGOING = 2 * BATCH_SIZE  # max_ongoing_requests per replica: one batch running, one filling
RAY_REPLY = "@@peers "  # prefix of the Ray client's replies on its stdout
RAY_TIMEOUT = 300.0  # seconds for the Ray client to start the cluster and deploy, or to answer a command
INSTALL_TIMEOUT = 1800.0  # seconds for one virtualenv's pip install
IDLE_S = 5.0  # seconds over which each worker's idle CPU is measured
_DEFAULT_VENV_DIR = Path.home() / ".cache" / "celery-gpu-bench" / "venvs"


@dataclass(frozen=True)
class Sizes:
    """How many items each measurement uses."""

    items: int  # one throughput round of a path
    rounds: int  # throughput rounds, the order of the paths rotating
    open_loop: int  # items per path at the fixed rate, all segments together
    segments: int  # open-loop segments, the order of the paths rotating
    warmup: int  # items sent in bulk after every input was seen once
    naive: int  # items timed one by one in a naive path

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(items=500, rounds=2, open_loop=300, segments=2, warmup=100, naive=2)
        return cls(items=2000, rounds=3, open_loop=1000, segments=4, warmup=200, naive=5)


# -- the peers' virtualenvs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerEnv:
    """A virtualenv of one peer: what to install in it, and what must import there afterwards."""

    name: str
    requirements: tuple[str, ...]
    check: str  # modules imported to accept the virtualenv
    versions: tuple[str, ...]  # distributions whose versions are recorded

    def directory(self, base: Path) -> Path:
        """``base/<name>-<hash of the Python version and the requirements>``: rebuilt when either changes."""
        key = json.dumps([sys.version, sys.platform, list(self.requirements)]).encode()
        return base / f"{self.name}-{hashlib.sha256(key).hexdigest()[:12]}"


def torch_requirement() -> str:
    """Exactly the torch of this environment (e.g. ``torch==2.13.0+cpu``): never a different (CUDA) build."""
    return f"torch=={metadata.version('torch')}"


def peer_envs() -> dict[str, PeerEnv]:
    torch_req = torch_requirement()
    return {
        "celery_batches": PeerEnv("celery-batches", ("celery[redis]>=5.5,<5.7", "celery-batches==0.11", torch_req),
                                  "celery, celery_batches, redis, torch",
                                  ("celery", "celery-batches", "kombu", "redis", "torch")),
        "ray_serve": PeerEnv("ray-serve", ("ray[serve]==2.60.0", torch_req), "ray, ray.serve, torch",
                             ("ray", "torch", "numpy")),
    }


@dataclass
class ReadyEnv:
    """A usable virtualenv: its interpreter and the versions installed in it."""

    python: str
    versions: dict[str, str | None]


def ensure_venv(env: PeerEnv, base: Path, log_dir: Path) -> ReadyEnv:
    """The virtualenv of ``env`` under ``base``, created and installed unless a complete one is there already.

    Raises ``RuntimeError`` with the reason when it cannot be built (pip's last lines)."""
    target = env.directory(base)
    python = target / "bin" / "python"
    marker = target / ".peers-ready"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)  # a half-built one from an interrupted run
        target.parent.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"install-{env.name}.log"
        print(f"  creating {target} ({', '.join(env.requirements)}); pip's output: {log}", flush=True)
        steps = [[sys.executable, "-m", "venv", str(target)],
                 [str(python), "-m", "pip", "install", "--disable-pip-version-check", *env.requirements]]
        with open(log, "wb") as out:
            for cmd in steps:
                try:
                    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          timeout=INSTALL_TIMEOUT, check=False)
                except subprocess.TimeoutExpired:
                    shutil.rmtree(target, ignore_errors=True)
                    raise RuntimeError(f"{shlex.join(cmd)} took over {INSTALL_TIMEOUT:.0f}s") from None
                if done.returncode:
                    shutil.rmtree(target, ignore_errors=True)
                    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
                    raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed ({done.returncode}): " + " | ".join(tail))
    probe = ("import importlib.metadata as m, json\n"
             f"import {env.check}\n"
             "def v(d):\n"
             "    try:\n        return m.version(d)\n"
             "    except m.PackageNotFoundError:\n        return None\n"
             f"print(json.dumps({{d: v(d) for d in {list(env.versions)!r}}}))\n")
    checked = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False, timeout=300)
    if checked.returncode:
        marker.unlink(missing_ok=True)
        raise RuntimeError(f"{target} does not import {env.check}: {checked.stderr.strip()[-500:]}")
    marker.write_text(json.dumps(list(env.requirements)) + "\n")
    return ReadyEnv(str(python), json.loads(checked.stdout))


def prepare_envs(paths: list[str], base: Path, log_dir: Path) -> tuple[dict[str, ReadyEnv], dict[str, str]]:
    """Every needed peer virtualenv, built in parallel; ``(ready, {path: why skipped})``."""
    wanted = {p: e for p, e in peer_envs().items() if p in paths}
    ready: dict[str, ReadyEnv] = {}
    skipped: dict[str, str] = {}

    def build(path: str, env: PeerEnv) -> None:
        try:
            ready[path] = ensure_venv(env, base, log_dir)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            skipped[path] = f"virtualenv {env.name} could not be built: {exc}"

    threads = [threading.Thread(target=build, args=item, daemon=True) for item in wanted.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path, env in ready.items():
        print(f"  {path}: {env.python} ({', '.join(f'{d} {v}' for d, v in env.versions.items())})", flush=True)
    for path, reason in skipped.items():
        print(f"  {path}: SKIPPED: {reason}", flush=True)
    return ready, skipped


def peer_env(broker: str, **extra: str) -> dict[str, str]:
    """Environment of a process in a peer's virtualenv: the repo alone on ``PYTHONPATH`` (none of celery-gpu's
    environment leaks in), the broker URL."""
    env = overhead.child_env(broker, **extra)
    env["PYTHONPATH"] = str(REPO)
    env.pop("VIRTUAL_ENV", None)
    return env


# -- processes: memory and CPU -------------------------------------------------------------------------------


def _status_kb(pid: int, path: str, key: str) -> int:
    """A ``key:  N kB`` line of ``/proc/<pid>/<path>`` (0 if the process or the line is gone)."""
    return _kb_line(Path(f"/proc/{pid}/{path}"), key)


def _kb_line(file: Path, key: str) -> int:
    """The number of a ``key:  N kB`` line of ``file`` (0 if the file or the line is missing)."""
    try:
        for line in file.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_label(pid: int) -> str:
    """A short name of a process for the memory breakdown: its title (Ray's ``ray::ServeReplica...``), or the
    module it runs (``celery``, ``celery_gpu.child``), or its executable."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return "?"
    if len(args) == 1:  # a process that set its own title
        return args[0].split()[0][:48]
    if "-m" in args[:3]:
        return args[args.index("-m") + 1]
    if "-c" in args[:3]:
        code = args[args.index("-c") + 1] if args.index("-c") + 1 < len(args) else ""
        return "spawned child (python -c)" if "spawn_main" in code else "python -c"
    first = Path(args[0]).name
    if first.startswith("python") and len(args) > 1:
        return Path(args[1].split()[0]).name if args[1] not in ("-u", "-E") else Path(args[2]).name
    return first


@dataclass
class Memory:
    """Resident memory of a set of processes, after warm-up."""

    rss_mb: float
    pss_mb: float
    processes: int
    breakdown_mb: dict[str, float]  # RSS per kind of process (see process_label)

    @classmethod
    def of(cls, pids: set[int], root: int | None = None) -> Memory:
        """Of ``pids``; a process labelled as ``root`` but another is called a child (forked pool children)."""
        rss: dict[int, int] = {pid: _status_kb(pid, "status", "VmRSS") for pid in pids}
        pss = sum(_status_kb(pid, "smaps_rollup", "Pss") for pid in pids)
        root_label = process_label(root) if root is not None else None
        breakdown: dict[str, float] = {}
        for pid, kb in rss.items():
            label = process_label(pid)
            if pid == root:
                label += " (main)"
            elif label == root_label:
                label += " (child)"
            breakdown[label] = breakdown.get(label, 0.0) + kb / 1024
        return cls(round(sum(rss.values()) / 1024, 1), round(pss / 1024, 1), len([k for k in rss.values() if k]),
                   {k: round(v, 1) for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])})


def tree_cpu_s(pids: set[int]) -> float:
    return sum(batching.proc_cpu_s(pid) for pid in pids)


# -- one worker (or Ray cluster) serving some paths ------------------------------------------------------------


@dataclass
class Run:
    """One throughput round of one path."""

    seconds: float
    values: list[float]
    cpu_ms_per_item: dict[str, float | None]
    mean_batch: float | None = None  # items per model call during the round (batching paths)


@dataclass
class OpenLoop:
    """One open-loop segment of one path."""

    latencies_s: list[float]  # scheduled send time to the result's arrival, per item
    lag_s: list[float]  # how late each item was sent (the client's own delay)
    values: list[float]


class Stack:
    """A running worker (or Ray cluster) that serves one or more paths."""

    label = "?"
    paths: list[str]
    ready_s: float = 0.0
    settings: dict[str, Any]

    def tree(self) -> set[int]:
        """Every process of the worker (not the client)."""
        raise NotImplementedError

    def root(self) -> int | None:
        """The worker's main process, if it has one (not Ray: the cluster's processes hang off the client)."""
        return None

    def client_cpu_s(self) -> float:
        raise NotImplementedError

    def broker_cpu_s(self) -> float | None:
        return None

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        """(items, batches) the worker has run for ``path`` so far; None where it does not batch."""
        return None

    def throughput(self, path: str, items: list[list[float]]) -> tuple[float, list[float]]:
        raise NotImplementedError

    def open_loop(self, path: str, inputs: list[list[float]], rate: float, count: int) -> OpenLoop:
        raise NotImplementedError

    def measured(self, path: str, items: list[list[float]]) -> Run:
        """``throughput`` with the CPU of the worker's tree, of the client and of the broker around it."""
        counted = self.batch_counters(path)
        tree = self.tree()
        before = (tree_cpu_s(tree), self.client_cpu_s(), self.broker_cpu_s())
        seconds, values = self.throughput(path, items)
        tree |= self.tree()
        after = (tree_cpu_s(tree), self.client_cpu_s(), self.broker_cpu_s())
        mean_batch = None
        if counted is not None and (now := self.batch_counters(path)) is not None and now[1] > counted[1]:
            mean_batch = round((now[0] - counted[0]) / (now[1] - counted[1]), 2)

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(1000 * max(0.0, b - a) / len(items), 4)

        cpu = {"worker": ms(before[0], after[0]), "client": ms(before[1], after[1]), "broker": ms(before[2], after[2])}
        cpu["total"] = round(sum(v for v in cpu.values() if v is not None), 4)
        return Run(seconds, values, cpu, mean_batch)


class CeleryStack(Stack):
    """A ``celery worker`` subprocess; the client is this process."""

    def __init__(self, label: str, worker: overhead.Worker, tasks: dict[str, Any], ready_s: float,
                 settings: dict[str, Any], counters: Callable[[str], tuple[int, int] | None] | None = None) -> None:
        self.label, self.worker, self.tasks, self.ready_s, self.settings = label, worker, tasks, ready_s, settings
        self.paths = list(tasks)
        self._broker_cpu = batching.broker_cpu_probe(next(iter(tasks.values())).app)
        self._counters = counters

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        return None if self._counters is None else self._counters(path)

    def tree(self) -> set[int]:
        return {self.worker.proc.pid} | overhead.descendants(self.worker.proc.pid)

    def root(self) -> int | None:
        return self.worker.proc.pid

    def client_cpu_s(self) -> float:
        times = os.times()
        return times.user + times.system

    def broker_cpu_s(self) -> float | None:
        return self._broker_cpu()

    def throughput(self, path: str, items: list[list[float]]) -> tuple[float, list[float]]:
        started = time.perf_counter()
        result_set = batching.send(self.tasks[path], items, path == "celery_gpu_bulk")
        values = [float(v) for v in batching.collect(result_set, self.worker)]
        return time.perf_counter() - started, values

    def open_loop(self, path: str, inputs: list[list[float]], rate: float, count: int) -> OpenLoop:
        return celery_open_loop(self.tasks[path], path == "celery_gpu_bulk", self.worker, inputs, rate, count)


class ResultListener(threading.Thread):
    """Notes when each awaited task's result is published on its Redis channel (Celery's Redis backend publishes
    every stored result on the channel named by its key): the arrival time at the client, whatever order the
    results come in, without Celery's result consumer."""

    def __init__(self, client: Any, keys: list[str]) -> None:
        super().__init__(name="result-listener", daemon=True)
        self.arrived: dict[str, float] = {}
        self._keys = set(keys)
        self._stop_event = threading.Event()
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(*keys)
        confirmed = 0
        deadline = time.monotonic() + 30
        while confirmed < len(keys):  # every SUBSCRIBE confirmed before anything is sent
            message = self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{confirmed} of {len(keys)} result channels subscribed")

    def run(self) -> None:
        try:
            while len(self.arrived) < len(self._keys) and not self._stop_event.is_set():
                message = self._pubsub.get_message(timeout=0.2)
                if message is None or message["type"] != "message":
                    continue
                now = time.perf_counter()
                channel = message["channel"]
                key = channel.decode() if isinstance(channel, bytes) else str(channel)
                if _final_state(message["data"]):
                    self.arrived.setdefault(key, now)
        finally:
            self._pubsub.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def _final_state(data: Any) -> bool:
    """Whether a published result meta is a final state (not STARTED/RETRY); true when it cannot be read."""
    try:
        status = json.loads(data).get("status")
    except (ValueError, AttributeError, TypeError):
        return True
    return status not in ("STARTED", "RETRY", "RECEIVED", "PENDING")


def celery_open_loop(task: Any, bulk: bool, worker: overhead.Worker, inputs: list[list[float]], rate: float,
                     count: int) -> OpenLoop:
    """Item ``i`` sent at ``t0 + i / rate`` (``submit_many([x])`` or ``apply_async``), with a task id chosen here
    so that its result channel is subscribed before it is sent; latency from the scheduled time to the result
    message's arrival. Then every result is read back through Celery (and checked by the caller)."""
    from celery.result import ResultSet

    backend = task.app.backend
    ids = [str(uuid.uuid4()) for _ in range(count)]
    keys = []
    for task_id in ids:
        key = backend.get_key_for_task(task_id)
        keys.append(key.decode() if isinstance(key, bytes) else str(key))
    listener = ResultListener(backend.client, keys)
    listener.start()
    results: list[Any] = []
    lags = [0.0] * count
    t0 = time.perf_counter() + 0.05
    try:
        for i, task_id in enumerate(ids):
            at = t0 + i / rate
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lags[i] = time.perf_counter() - at
            x = inputs[i % len(inputs)]
            if bulk:
                results.extend(task.submit_many([x], task_id=task_id).results)
            else:
                results.append(task.apply_async((x,), task_id=task_id))
        values = [float(v) for v in batching.collect(ResultSet(results, app=task.app), worker)]
        listener.join(timeout=10)
    finally:
        listener.stop()
    missing = [k for k in keys if k not in listener.arrived]
    if missing:
        raise RuntimeError(f"{len(missing)} result messages of {worker.hostname} never arrived (e.g. {missing[0]})")
    latencies = [listener.arrived[key] - (t0 + i / rate) for i, key in enumerate(keys)]
    return OpenLoop(latencies, lags, values)


class RayStack(Stack):
    """The Ray client script (``benchmarks._peers_ray``) in the Ray virtualenv: it starts the local cluster as its
    own children, deploys the model and runs the commands it is sent; it is the client, its children the worker."""

    label = "ray_serve"

    def __init__(self, proc: subprocess.Popen[str], log_path: Path, replies: queue.Queue[str | None],
                 hello: dict[str, Any], ready_s: float) -> None:
        self.proc, self.log_path, self.replies, self.ready_s = proc, log_path, replies, ready_s
        self.paths = ["ray_serve"]
        self.settings = dict(hello.get("settings", {}))
        self.replica_pids: list[int] = list(hello.get("replica_pids", []))
        self.seen = self.tree()  # every process of the cluster seen so far: killed if one outlives the client
        self.stop_s: float | None = None
        self.left_behind: int | None = None

    @classmethod
    @contextlib.contextmanager
    def started(cls, python: str, broker: str, log_dir: Path) -> Iterator[RayStack]:
        """Start the client (and so the cluster); always stop both on the way out (leftovers killed)."""
        log_path = log_dir / "ray-serve.log"
        temp_dir = Path(tempfile.mkdtemp(prefix="peers-ray-"))  # short: Ray puts unix sockets under it
        cmd = [python, "-m", "benchmarks._peers_ray", "--replicas", str(PROCESSES), "--num-cpus", str(PROCESSES),
               "--max-ongoing", str(RAY_MAX_ONGOING), "--pool", str(INPUT_POOL), "--temp-dir", str(temp_dir)]
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=peer_env(broker, RAY_USAGE_STATS_ENABLED="0"),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    bufsize=1, start_new_session=True)
        # overhead.Worker for its stop(): SIGTERM, SIGKILL after a while, then whatever outlived it is killed.
        holder = overhead.Worker(proc, "ray-serve", log_path)  # type: ignore[arg-type]
        stack: RayStack | None = None
        try:
            replies: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(proc, replies, log_path), daemon=True).start()
            hello = _next_reply(proc, replies, log_path, RAY_TIMEOUT)
            stack = cls(proc, log_path, replies, hello, time.monotonic() - started)
            print(f"  Ray Serve ready after {stack.ready_s:.1f}s; replicas {stack.replica_pids}", flush=True)
            yield stack
        finally:
            holder.pids |= overhead.descendants(proc.pid) | (stack.seen if stack is not None else set())
            stopping = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                    proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)  # serve.shutdown() and ray.shutdown()
            holder.stop()
            if stack is not None:  # from the stop command until the client (and the cluster) exited
                stack.stop_s, stack.left_behind = round(time.monotonic() - stopping, 2), holder.left_behind
            shutil.rmtree(temp_dir, ignore_errors=True)

    def request(self, command: dict[str, Any], timeout: float = RAY_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = _next_reply(self.proc, self.replies, self.log_path, timeout)
        if "error" in answer:
            raise RuntimeError(f"Ray client: {answer['error']}")
        self.seen |= self.tree()
        return answer

    def tree(self) -> set[int]:
        return overhead.descendants(self.proc.pid)

    def client_cpu_s(self) -> float:
        return batching.proc_cpu_s(self.proc.pid)

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        answer = self.request({"cmd": "stats", "replicas": PROCESSES})
        return int(answer["items"]), int(answer["batches"])

    def warm_up(self, count: int) -> list[float]:
        return [float(v) for v in self.request({"cmd": "warmup", "count": count})["values"]]

    def throughput(self, path: str, items: list[list[float]]) -> tuple[float, list[float]]:
        answer = self.request({"cmd": "throughput", "count": len(items)})
        return float(answer["seconds"]), [float(v) for v in answer["values"]]

    def open_loop(self, path: str, inputs: list[list[float]], rate: float, count: int) -> OpenLoop:
        answer = self.request({"cmd": "open_loop", "rate": rate, "count": count},
                              timeout=RAY_TIMEOUT + count / rate)
        return OpenLoop([float(v) for v in answer["latencies_s"]], [float(v) for v in answer["lag_s"]],
                        [float(v) for v in answer["values"]])


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None], log_path: Path) -> None:
    """The Ray client's stdout: replies to ``lines``, anything else to its log; None once it closes."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RAY_REPLY):
            lines.put(line[len(RAY_REPLY):])
        else:
            with open(log_path, "a") as log:
                log.write(line)
    lines.put(None)


def _next_reply(proc: subprocess.Popen[str], lines: queue.Queue[str | None], log_path: Path,
                timeout: float) -> dict[str, Any]:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no answer from the Ray client in {timeout:.0f}s:\n{_tail(log_path)}") from None
    if line is None:
        raise RuntimeError(f"the Ray client exited ({proc.poll()}):\n{_tail(log_path)}")
    reply: dict[str, Any] = json.loads(line)
    return reply


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- starting the stacks -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def celery_gpu_stack(url: str, paths: list[str], inputs: list[list[float]], reference: list[float], sizes: Sizes,
                     per_device: int, log_dir: Path) -> Iterator[CeleryStack]:
    """``batching.py``'s celery-gpu worker (``started_worker``: readiness, warm-up with checked outputs)."""
    names = {"celery_gpu_bulk": "batched_bulk", "celery_gpu_delay": "batched_delay"}
    env = overhead.child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(per_device))
    with batching.started_worker("peers-gpu", GPU_APP, [], env, per_device, [names[p] for p in paths], inputs,
                                 reference, _batching_sizes(sizes), log_dir) as (worker, tasks, info):
        by_path = {p: tasks[names[p]] for p in paths}

        def counters(path: str) -> tuple[int, int]:
            task = by_path[path]
            stats = batching.batching_stats(task.app, worker.hostname, task.name)
            return int(stats.get("items", 0)), int(stats.get("batches", 0))

        yield CeleryStack("celery_gpu", worker, by_path, info.ready_s,
                          {"app": GPU_APP, "CELERY_GPU_DEVICES": "cpu", "CELERY_GPU_PER_DEVICE": per_device,
                           "batch": BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS}, counters)


@contextlib.contextmanager
def plain_stack(url: str, inputs: list[list[float]], reference: list[float], sizes: Sizes,
                log_dir: Path) -> Iterator[CeleryStack]:
    """``overhead.py``'s plain Celery worker: prefork, spawned children, the model built once per child."""
    args = ["--pool", "prefork", "--concurrency", str(PROCESSES)]
    with batching.started_worker("peers-plain", PLAIN_APP, args, overhead.child_env(url), PROCESSES,
                                 ["plain_celery"], inputs, reference, _batching_sizes(sizes),
                                 log_dir) as (worker, tasks, info):
        yield CeleryStack("plain_celery", worker, {"plain_celery": tasks["plain_celery"]}, info.ready_s,
                          {"app": PLAIN_APP, "pool": "prefork", "concurrency": PROCESSES,
                           "worker_pool_start_method": "spawn", "worker_prefetch_multiplier": 4})


def batches_client(url: str) -> types.ModuleType:
    """Stand-ins of the celery-batches worker's tasks for this process (Celery 5.7): the same names and queue,
    never run here. A module object with ``app``, ``mlp`` and ``whoami``, as ``batching.wait_ready`` expects."""
    from celery import Celery

    app = Celery("peers_batches_client", broker=url, backend=url)
    app.conf.update(task_default_queue=BATCHES_QUEUE, broker_connection_retry_on_startup=True, result_expires=600,
                    **serializer_conf())

    def elsewhere(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("runs on the celery-batches worker only")

    client = types.ModuleType("peers_batches_client")
    setattr(client, "app", app)  # noqa: B010  (a module object has no declared attributes)
    setattr(client, "mlp", app.task(name=BATCHES_MLP)(elsewhere))  # noqa: B010
    setattr(client, "whoami", app.task(name=BATCHES_WHOAMI)(elsewhere))  # noqa: B010
    return client


@contextlib.contextmanager
def batches_stack(url: str, python: str, pool: str, prefetch: int, inputs: list[list[float]],
                  reference: list[float], sizes: Sizes, log_dir: Path) -> Iterator[CeleryStack]:
    """The celery-batches worker, from its own virtualenv: readiness and warm-up as for the other workers."""
    client = batches_client(url)
    client.app.control.purge()  # leftovers of an interrupted run on a shared broker
    args = ["--pool", pool, "--concurrency", str(PROCESSES)]
    processes = PROCESSES if pool == "prefork" else 1  # threads and solo run the tasks in the main process
    env = peer_env(url, PEERS_BATCHES_PREFETCH=str(prefetch))
    started = time.monotonic()
    with overhead.celery_worker(BATCHES_APP, "peers-batches", args, env, log_dir, python=python) as worker:
        print(f"  waiting for {processes} process(es) of {worker.hostname} ...", flush=True)
        batching.wait_ready(client, worker, processes)
        ready_s = time.monotonic() - started
        print(f"  ready after {ready_s:.1f}s; warming up", flush=True)
        batching.warm_up("peers-batches", [client.mlp], worker, inputs, reference, _batching_sizes(sizes))
        redis = client.app.backend.client

        def counters(path: str) -> tuple[int, int]:
            raw = redis.hgetall(BATCHES_STATS_KEY)  # written by the worker's batch task, one HINCRBY per batch
            stats = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
            return stats.get("items", 0), stats.get("batches", 0)

        yield CeleryStack("celery_batches", worker, {"celery_batches": client.mlp}, ready_s,
                          {"app": BATCHES_APP, "pool": pool, "concurrency": PROCESSES,
                           "worker_prefetch_multiplier": prefetch, "flush_every": BATCH_SIZE,
                           "flush_interval_s": MAX_WAIT_MS / 1000, "results": "app.backend.mark_as_done per request"},
                          counters)
        print(f"  stopping {worker.hostname}", flush=True)


@contextlib.contextmanager
def ray_stack(url: str, python: str, reference: list[float], sizes: Sizes, log_dir: Path) -> Iterator[RayStack]:
    print("  starting a local Ray cluster and deploying (the first start takes a while) ...", flush=True)
    with RayStack.started(python, url, log_dir) as stack:
        batching.check_outputs("ray_serve warm-up", stack.warm_up(sizes.warmup), reference)
        yield stack


def _batching_sizes(sizes: Sizes) -> batching.Sizes:
    """The sizes ``batching.started_worker`` / ``warm_up`` read (only ``warmup``)."""
    return batching.Sizes(items=sizes.items, sequential=0, warmup=sizes.warmup)


# -- measuring -------------------------------------------------------------------------------------------------


@dataclass
class PathFigures:
    """Everything measured for one path."""

    name: str
    stack: str
    rounds: list[Run] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    naive: overhead.PathResult | None = None

    @property
    def items_per_s(self) -> float:
        if self.naive is not None:
            return self.naive.items_per_s
        return statistics.median(len(r.values) / r.seconds for r in self.rounds)


def settle() -> None:
    """Collect this client's garbage now and freeze what survives, outside any timed run.

    The client has imported torch (for the reference outputs) and three Celery apps: about 200,000 objects. A
    full collection over them took about 300 ms on a 2-core machine, landing in whichever run was going (as a
    p99 of 300 ms, and a send 300 ms late). Frozen objects are no longer scanned; the Ray client does the same."""
    gc.collect()
    gc.freeze()


def rotate(names: list[str], turn: int) -> list[str]:
    k = turn % len(names) if names else 0
    return names[k:] + names[:k]


def measure_throughput(stacks: dict[str, Stack], figures: dict[str, PathFigures], inputs: list[list[float]],
                       reference: list[float], sizes: Sizes) -> None:
    names = list(figures)
    items = [inputs[i % len(inputs)] for i in range(sizes.items)]
    for round_no in range(sizes.rounds):
        print(f"\n[throughput, round {round_no + 1}/{sizes.rounds}: {sizes.items} items per path]", flush=True)
        for name in rotate(names, round_no):
            stack = stacks[figures[name].stack]
            settle()
            run = stack.measured(name, items)
            batching.check_outputs(name, run.values, reference)
            figures[name].rounds.append(run)
            batch = "" if run.mean_batch is None else f", mean batch {run.mean_batch:.1f}"
            print(f"  {name}: {len(items) / run.seconds:.1f} items/s ({run.seconds:.2f}s{batch}); CPU ms/item "
                  f"{run.cpu_ms_per_item}", flush=True)


def measure_latency(stacks: dict[str, Stack], figures: dict[str, PathFigures], inputs: list[list[float]],
                    reference: list[float], sizes: Sizes, rate: float) -> None:
    names = list(figures)
    per_segment = max(1, sizes.open_loop // sizes.segments)
    for segment in range(sizes.segments):
        print(f"\n[latency at {rate:g} items/s, segment {segment + 1}/{sizes.segments}: {per_segment} items per "
              f"path]", flush=True)
        for name in rotate(names, segment):
            settle()
            run = stacks[figures[name].stack].open_loop(name, inputs, rate, per_segment)
            batching.check_outputs(name, run.values, reference)
            figures[name].latencies_s += run.latencies_s
            figures[name].lag_s += run.lag_s
            ordered = sorted(run.latencies_s)
            print(f"  {name}: p50 {1000 * statistics.median(ordered):.2f} ms, "
                  f"p99 {1000 * batching.percentile(ordered, 0.99):.2f} ms, "
                  f"max send lag {1000 * max(run.lag_s):.1f} ms", flush=True)


def idle_cpu(stacks: dict[str, Stack], seconds: float) -> dict[str, float]:
    """CPU used by each worker (its whole tree, and for Ray the client that holds the cluster) while no path
    runs, as a percentage of one core."""
    trees = {name: s.tree() for name, s in stacks.items()}
    before = {name: tree_cpu_s(trees[name]) + (s.client_cpu_s() if isinstance(s, RayStack) else 0.0)
              for name, s in stacks.items()}
    time.sleep(seconds)
    after = {name: tree_cpu_s(trees[name]) + (s.client_cpu_s() if isinstance(s, RayStack) else 0.0)
             for name, s in stacks.items()}
    return {name: round(100 * (after[name] - before[name]) / seconds, 1) for name in stacks}


def naive_path(name: str, url: str, inputs: list[list[float]], reference: list[float], count: int
               ) -> overhead.PathResult:
    run_one = overhead.subprocess_item(overhead.child_env(url)) if name == "subprocess" \
        else overhead.spawned_process_item()
    result = overhead.time_items(name, run_one, inputs, count)
    batching.check_outputs(name, [result.outputs[i] for i in sorted(result.outputs)], reference)
    return result


def auto_rate(figures: dict[str, PathFigures]) -> tuple[float, str]:
    """Half the slowest batching path's items/s, rounded down to a multiple of 10 (of 1 below 20/s)."""
    batching_rates = {n: f.items_per_s for n, f in figures.items() if n in BATCHING_PATHS and f.rounds}
    pool = batching_rates or {n: f.items_per_s for n, f in figures.items() if f.rounds}
    slowest = min(pool, key=lambda n: pool[n])
    raw = LOAD_FRACTION * pool[slowest]
    rate = float(int(raw // 10) * 10) if raw >= 20 else float(max(1, int(raw)))
    return rate, f"{LOAD_FRACTION:g} x {slowest} ({pool[slowest]:.1f} items/s), rounded down"


# -- report ----------------------------------------------------------------------------------------------------


def machine_info(envs: dict[str, ReadyEnv]) -> dict[str, Any]:
    info = overhead.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    info["memory_gib"] = round(_kb_line(Path("/proc/meminfo"), "MemTotal") / 2**20, 1) or None
    info["kombu"] = _version("kombu")
    info["peers"] = {path: env.versions for path, env in envs.items()}
    return info


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def report(figures: dict[str, PathFigures], stacks_info: dict[str, dict[str, Any]], skipped: dict[str, str],
           rate: float | None, rate_basis: str | None, sizes: Sizes, envs: dict[str, ReadyEnv],
           args: argparse.Namespace, broker: str, command: str) -> dict[str, Any]:
    """Print the table and build the JSON summary."""
    paths: dict[str, dict[str, Any]] = {}
    for name, f in figures.items():
        info = stacks_info.get(f.stack, {})
        entry: dict[str, Any] = {"items_per_s": round(f.items_per_s, 2), "worker": f.stack}
        if f.naive is not None:
            entry.update(p50_ms=round(f.naive.p50_ms, 1), p99_ms=None, latency="one item at a time, idle machine: "
                         "interpreter start, import torch, build the model, one input", note=f.naive.note)
        else:
            ordered = sorted(f.latencies_s)
            entry.update(
                rounds_items_per_s=[round(len(r.values) / r.seconds, 2) for r in f.rounds],
                best_items_per_s=round(max(len(r.values) / r.seconds for r in f.rounds), 2),
                mean_batch=_median([r.mean_batch for r in f.rounds]),
                p50_ms=round(1000 * statistics.median(ordered), 3) if ordered else None,
                p99_ms=round(1000 * batching.percentile(ordered, 0.99), 3) if ordered else None,
                p90_ms=round(1000 * batching.percentile(ordered, 0.9), 3) if ordered else None,
                max_ms=round(1000 * ordered[-1], 3) if ordered else None,
                latency_items=len(ordered),
                send_lag_p99_ms=round(1000 * batching.percentile(sorted(f.lag_s), 0.99), 3) if f.lag_s else None,
                load=round(rate / f.items_per_s, 3) if rate else None,
                cpu_ms_per_item=_median_cpu(f.rounds),
            )
            entry.update({k: info[k] for k in ("rss_mb", "pss_mb", "processes", "rss_breakdown_mb", "idle_cpu_pct")
                          if k in info})
        paths[name] = entry

    bulk = figures.get("celery_gpu_bulk")

    def ratio(other: str) -> float | None:
        if bulk is None or other not in figures:
            return None
        return round(bulk.items_per_s / figures[other].items_per_s, 3)

    def cpu_ratio(other: str) -> float | None:
        """The other path's CPU ms per item (every party: worker, client, broker) over celery_gpu_bulk's: less
        sensitive to other load on a shared machine than items/s."""
        mine = (paths.get("celery_gpu_bulk") or {}).get("cpu_ms_per_item", {}).get("total")
        theirs = (paths.get(other) or {}).get("cpu_ms_per_item", {}).get("total")
        return round(theirs / mine, 3) if mine and theirs else None

    print()
    print(f"{'path':<18} {'items/s':>9} {'bulk/x':>7} {'batch':>6} {'p50 ms':>8} {'p99 ms':>9} {'load':>5} "
          f"{'RSS MB':>8} {'PSS MB':>8} {'CPU ms/item':>11}")
    print("-" * 101)

    def cell(value: Any, width: int, digits: int = 2) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for name, e in paths.items():
        cpu = (e.get("cpu_ms_per_item") or {}).get("total")
        print(f"{name:<18} {e['items_per_s']:>9.1f} {cell(ratio(name), 7)} {cell(e.get('mean_batch'), 6, 1)} "
              f"{cell(e.get('p50_ms'), 8)} "
              f"{cell(e.get('p99_ms'), 9)} {cell(e.get('load'), 5)} {cell(e.get('rss_mb'), 8, 0)} "
              f"{cell(e.get('pss_mb'), 8, 0)} {cell(cpu, 11, 3)}")
    for name, reason in skipped.items():
        print(f"{name:<18} SKIPPED: {reason}")

    summary: dict[str, Any] = {
        "benchmark": "peers",
        "quick": args.quick,
        "broker": broker,
        "machine": machine_info(envs),
        "sizes": {"items": sizes.items, "rounds": sizes.rounds, "open_loop_items": sizes.open_loop,
                  "open_loop_segments": sizes.segments, "warmup": sizes.warmup, "naive_items": sizes.naive,
                  "batch": BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS, "model_processes": PROCESSES,
                  "serializer": "json"},
        "rate_per_s": rate,
        "rate_basis": rate_basis,
        "paths": paths,
        "skipped": skipped,
        "items_per_s": {n: e["items_per_s"] for n, e in paths.items()},
        "p50_ms": {n: e.get("p50_ms") for n, e in paths.items()},
        "p99_ms": {n: e.get("p99_ms") for n, e in paths.items()},
        "rss_mb": {n: e.get("rss_mb") for n, e in paths.items()},
        "ratio_vs_celery_batches": ratio("celery_batches"),
        "ratio_vs_ray_serve": ratio("ray_serve"),
        "ratio_vs_plain_celery": ratio("plain_celery"),
        "cpu_ratio_vs_celery_batches": cpu_ratio("celery_batches"),
        "cpu_ratio_vs_ray_serve": cpu_ratio("ray_serve"),
        "cpu_ratio_vs_plain_celery": cpu_ratio("plain_celery"),
        "ratio_vs_subprocess": ratio("subprocess"),
        "ratio_vs_process": ratio("process"),
        "workers": stacks_info,
        "outputs_checked": True,  # every output matched the reference computed here, or the run failed
        "command": command,
    }
    print()
    for other in ("celery_batches", "ray_serve", "plain_celery"):
        value = summary[f"ratio_vs_{other}"]
        cpu = summary[f"cpu_ratio_vs_{other}"]
        print(f"celery_gpu_bulk items/s / {other}: {'-' if value is None else f'{value:.2f}x'}; "
              f"{other} CPU per item / celery_gpu_bulk's: {'-' if cpu is None else f'{cpu:.2f}x'}")
    return summary


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _median_cpu(rounds: list[Run]) -> dict[str, float | None]:
    """Per party, the median over the rounds of CPU ms per item."""
    if not rounds:
        return {}
    out: dict[str, float | None] = {}
    for key in rounds[0].cpu_ms_per_item:
        values = [v for r in rounds if (v := r.cpu_ms_per_item.get(key)) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    return out


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (500 items x 2 rounds, 300 open-loop items, 2 naive items)")
    parser.add_argument("--broker", help="Redis URL to use, e.g. redis://127.0.0.1:6379/8 (default: an embedded "
                                         "Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--rate", type=float, help=f"arrival rate of the latency runs, items/s (default: "
                                                   f"{LOAD_FRACTION:g} x the slowest batching path's items/s)")
    parser.add_argument("--per-device", type=int, default=PROCESSES,
                        help=f"device processes of the celery-gpu worker (default {PROCESSES}, as many model "
                             f"processes as every other path has)")
    parser.add_argument("--batches-pool", default="prefork", choices=("prefork", "threads", "solo"),
                        help=f"pool of the celery-batches worker (concurrency {PROCESSES}; default prefork)")
    parser.add_argument("--batches-prefetch", type=int, default=BATCHES_PREFETCH,
                        help=f"worker_prefetch_multiplier of the celery-batches worker (default {BATCHES_PREFETCH}; "
                             f"0: no limit)")
    parser.add_argument("--venv-dir", type=Path, default=_DEFAULT_VENV_DIR,
                        help=f"where the peers' virtualenvs are created and reused (default {_DEFAULT_VENV_DIR})")
    parser.add_argument("--prepare", action="store_true", help="only build the peers' virtualenvs, then exit")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    if args.per_device < 1:
        parser.error("--per-device must be >= 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    return args


@dataclass
class Outcome:
    figures: dict[str, PathFigures]
    stacks_info: dict[str, dict[str, Any]]
    skipped: dict[str, str]
    rate: float | None
    rate_basis: str | None


def run_paths(url: str, paths: list[str], sizes: Sizes, args: argparse.Namespace, envs: dict[str, ReadyEnv],
              skipped: dict[str, str], log_dir: Path) -> Outcome:
    os.environ["OVERHEAD_BROKER"] = url  # read by the app modules when they are imported
    os.environ[SERIALIZER_ENV] = "json"  # the same, and passed on to the workers by child_env
    inputs = make_inputs(INPUT_POOL)
    model = build_model()  # the reference outputs; one thread here too
    reference = [infer(model, x) for x in inputs]
    figures: dict[str, PathFigures] = {}
    stacks_info: dict[str, dict[str, Any]] = {}
    rate: float | None = None
    basis: str | None = None
    with contextlib.ExitStack() as exit_stack:
        stacks: dict[str, Stack] = {}
        gpu_paths = [p for p in paths if p in ("celery_gpu_bulk", "celery_gpu_delay")]
        if gpu_paths:
            print(f"\n[celery-gpu worker: {', '.join(gpu_paths)}]", flush=True)
            stacks["celery_gpu"] = exit_stack.enter_context(
                celery_gpu_stack(url, gpu_paths, inputs, reference, sizes, args.per_device, log_dir))
        if "celery_batches" in paths and "celery_batches" in envs:
            print("\n[celery-batches worker]", flush=True)
            try:
                stacks["celery_batches"] = exit_stack.enter_context(
                    batches_stack(url, envs["celery_batches"].python, args.batches_pool, args.batches_prefetch,
                                  inputs, reference, sizes, log_dir))
            except (RuntimeError, TimeoutError) as exc:
                skipped["celery_batches"] = f"the celery-batches worker did not start: {exc}"
                print(f"  SKIPPED: {skipped['celery_batches']}", flush=True)
        if "ray_serve" in paths and "ray_serve" in envs:
            print("\n[Ray Serve]", flush=True)
            try:
                stacks["ray_serve"] = exit_stack.enter_context(
                    ray_stack(url, envs["ray_serve"].python, reference, sizes, log_dir))
            except (RuntimeError, TimeoutError) as exc:
                skipped["ray_serve"] = f"Ray Serve did not start: {exc}"
                print(f"  SKIPPED: {skipped['ray_serve']}", flush=True)
        if "plain_celery" in paths:
            print("\n[plain Celery worker]", flush=True)
            stacks["plain_celery"] = exit_stack.enter_context(plain_stack(url, inputs, reference, sizes, log_dir))

        for path in LOOP_PATHS:
            for label, stack in stacks.items():
                if path in stack.paths:
                    figures[path] = PathFigures(path, label)
        if stacks:
            print(f"\n[every worker warmed up; memory, then idle CPU over {IDLE_S:g}s]", flush=True)
            for label, stack in stacks.items():
                memory = Memory.of(stack.tree(), stack.root())
                stacks_info[label] = {"ready_s": round(stack.ready_s, 1), "settings": stack.settings,
                                      "rss_mb": memory.rss_mb, "pss_mb": memory.pss_mb,
                                      "processes": memory.processes, "rss_breakdown_mb": memory.breakdown_mb}
                print(f"  {label}: {memory.rss_mb:.0f} MB RSS ({memory.pss_mb:.0f} MB PSS) in {memory.processes} "
                      f"processes: {memory.breakdown_mb}", flush=True)
            for label, pct in idle_cpu(stacks, IDLE_S).items():
                stacks_info[label]["idle_cpu_pct"] = pct
                print(f"  {label}: {pct:.1f}% of a core while idle", flush=True)

            measure_throughput(stacks, figures, inputs, reference, sizes)
            rate, basis = (args.rate, "--rate") if args.rate else auto_rate(figures)
            measure_latency(stacks, figures, inputs, reference, sizes, rate)
            for label, stack in stacks.items():
                stacks_info[label]["rss_mb_end"] = Memory.of(stack.tree()).rss_mb
        print()
        # Everything stops here: the naive paths below get the machine without idle workers.
    for label, stack in stacks.items():
        if isinstance(stack, CeleryStack):
            stacks_info[label].update(stop_s=stack.worker.stop_s, left_behind=stack.worker.left_behind)
        elif isinstance(stack, RayStack):
            stacks_info[label].update(stop_s=stack.stop_s, left_behind=stack.left_behind)
    for name in (p for p in NAIVE_PATHS if p in paths):
        print(f"\n[{name}: {sizes.naive} items, one at a time]", flush=True)
        figures[name] = PathFigures(name, name, naive=naive_path(name, url, inputs, reference, sizes.naive))
    return Outcome({p: figures[p] for p in PATHS if p in figures}, stacks_info, skipped, rate, basis)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, overhead._exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    shown = [overhead.redact(a) if "://" in a else a for a in (sys.argv[1:] if argv is None else argv)]
    command = shlex.join(["python", "benchmarks/peers.py", *shown])
    started = time.monotonic()
    source = batching.source_state()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        log_dir = Path(tmp)
        print(f"[virtualenvs of the peers, under {args.venv_dir}]", flush=True)
        envs, skipped = prepare_envs(paths, args.venv_dir, log_dir)
        if args.prepare:
            return 1 if skipped else 0
        with contextlib.ExitStack() as stack:
            url, broker = overhead.open_broker(stack, args.broker)
            print(f"broker: {broker}; {os.cpu_count()} CPUs; sizes: {sizes}", flush=True)
            try:
                outcome = run_paths(url, paths, sizes, args, envs, skipped, log_dir)
            except BaseException as exc:
                code = overhead._exit_code(exc)
            else:
                code = 0
            # As overhead.py: drop the failure's pending results while Redis still runs.
            if code:
                return code
    summary = report(outcome.figures, outcome.stacks_info, outcome.skipped, outcome.rate, outcome.rate_basis, sizes,
                     envs, args, broker, command)
    after = batching.source_state()
    summary["source"] = {**source, "changed_during_run": after["src_digest"] != source["src_digest"]}
    if summary["source"]["changed_during_run"]:
        print("warning: src/celery_gpu changed while this ran: the figures mix two versions", file=sys.stderr)
    summary["total_s"] = round(time.monotonic() - started, 1)
    print(f"total time: {summary['total_s']:.1f}s")
    overhead.emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
