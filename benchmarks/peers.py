"""celery-gpu next to what users would otherwise use, side by side, in one run on one machine.

The anchor workload of ``benchmarks/overhead.py`` and ``benchmarks/batching.py`` (MLP 512 -> 2048 -> 2048 -> 512,
float32, ``torch.set_num_threads(1)`` in every process that runs it, one 1x512 item per request sent as a list of
floats, one float back: the sum of the output) through these paths, with two model processes (or replicas)
each, and a batch of 64 with a 5 ms wait wherever the tool batches:

0. ``celery_gpu_packed``: the worker of 1., items sent with ``submit_many(items, pack=256)`` (256 items per broker
   message, each still a task of its own), where celery-gpu has packed submission (issue 18); skipped otherwise.
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
the best celery-gpu path's items/s over each (``best_celery_gpu_path`` names it: packed, where it ran).

Usage::

    python benchmarks/peers.py [--quick] [--broker redis://127.0.0.1:6379/8] [--out results.json]
                               [--paths celery_gpu_bulk,celery_batches,ray_serve] [--rate 150]
                               [--venv-dir DIR] [--prepare]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._batching_model import SERIALIZER_ENV  # noqa: E402
from benchmarks._overhead_model import build_model, infer, make_inputs  # noqa: E402
from benchmarks._peers_celery import (  # noqa: E402
    BATCHES_PREFETCH,
    CeleryStack,
    batches_stack,
    celery_gpu_stack,
    plain_stack,
)
from benchmarks._peers_measure import (  # noqa: E402
    LOAD_FRACTION,
    PathFigures,
    Sizes,
    auto_rate,
    idle_cpu,
    measure_latency,
    measure_throughput,
    naive_path,
)
from benchmarks._peers_memory import Memory  # noqa: E402
from benchmarks._peers_ray_stack import RayStack, ray_stack  # noqa: E402
from benchmarks._peers_report import report  # noqa: E402
from benchmarks._peers_stack import INPUT_POOL, PROCESSES, Stack  # noqa: E402
from benchmarks._peers_venvs import DEFAULT_VENV_DIR, ReadyEnv, prepare_envs  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    command_line,
    emit,
    exit_on_sigterm,
    open_broker,
    run_guarded,
    source_after,
    source_state,
)

PATHS = ("celery_gpu_packed", "celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve", "plain_celery",
         "subprocess", "process")
LOOP_PATHS = ("celery_gpu_packed", "celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve",
              "plain_celery")
NAIVE_PATHS = ("subprocess", "process")
IDLE_S = 5.0  # seconds over which each worker's idle CPU is measured


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
    parser.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR,
                        help=f"where the peers' virtualenvs are created and reused (default {DEFAULT_VENV_DIR})")
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



def start_stacks(exit_stack: contextlib.ExitStack, url: str, paths: list[str], args: argparse.Namespace,
                 envs: dict[str, ReadyEnv], skipped: dict[str, str], inputs: list[list[float]],
                 reference: list[float], sizes: Sizes, log_dir: Path) -> dict[str, Stack]:
    """Start and warm up every worker (and the Ray cluster) that ``paths`` need, one after another, for as long as
    ``exit_stack``; a peer that does not start is noted in ``skipped``."""
    stacks: dict[str, Stack] = {}
    gpu_paths = [p for p in paths if p.startswith("celery_gpu")]
    if "celery_gpu_packed" in gpu_paths and not supports_pack():
        skipped["celery_gpu_packed"] = "this celery-gpu has no packed submission (submit_many(items, pack=...))"
        gpu_paths.remove("celery_gpu_packed")
    if gpu_paths:
        print(f"\n[celery-gpu worker: {', '.join(gpu_paths)}]", flush=True)
        stacks["celery_gpu"] = exit_stack.enter_context(
            celery_gpu_stack(url, gpu_paths, inputs, reference, sizes.warmup, args.per_device, log_dir))
    if "celery_batches" in paths and "celery_batches" in envs:
        print("\n[celery-batches worker]", flush=True)
        try:
            stacks["celery_batches"] = exit_stack.enter_context(
                batches_stack(url, envs["celery_batches"].python, args.batches_pool, args.batches_prefetch,
                              inputs, reference, sizes.warmup, log_dir))
        except (RuntimeError, TimeoutError) as exc:
            skipped["celery_batches"] = f"the celery-batches worker did not start: {exc}"
            print(f"  SKIPPED: {skipped['celery_batches']}", flush=True)
    if "ray_serve" in paths and "ray_serve" in envs:
        print("\n[Ray Serve]", flush=True)
        try:
            stacks["ray_serve"] = exit_stack.enter_context(
                ray_stack(url, envs["ray_serve"].python, reference, sizes.warmup, log_dir))
        except (RuntimeError, TimeoutError) as exc:
            skipped["ray_serve"] = f"Ray Serve did not start: {exc}"
            print(f"  SKIPPED: {skipped['ray_serve']}", flush=True)
    if "plain_celery" in paths:
        print("\n[plain Celery worker]", flush=True)
        stacks["plain_celery"] = exit_stack.enter_context(plain_stack(url, inputs, reference, sizes.warmup, log_dir))
    return stacks


def supports_pack() -> bool:
    """Whether this celery-gpu has packed submission (``submit_many(items, pack=...)``, issue 18)."""
    import inspect

    from celery_gpu.tasks.submit import GPUTaskMixin

    return "pack" in inspect.signature(GPUTaskMixin.submit_many).parameters


def record_idle(stacks: dict[str, Stack], stacks_info: dict[str, dict[str, Any]]) -> None:
    """Every worker's settings, memory after warm-up and idle CPU, into ``stacks_info``."""
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


def record_stops(stacks: dict[str, Stack], stacks_info: dict[str, dict[str, Any]]) -> None:
    """How long each worker took to stop and what it left behind, into ``stacks_info``."""
    for label, stack in stacks.items():
        if isinstance(stack, CeleryStack):
            stacks_info[label].update(stop_s=stack.worker.stop_s, left_behind=stack.worker.left_behind)
        elif isinstance(stack, RayStack):
            stacks_info[label].update(stop_s=stack.stop_s, left_behind=stack.left_behind)


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
        stacks = start_stacks(exit_stack, url, paths, args, envs, skipped, inputs, reference, sizes, log_dir)
        for path in LOOP_PATHS:
            for label, stack in stacks.items():
                if path in stack.paths:
                    figures[path] = PathFigures(path, label)
        if stacks:
            record_idle(stacks, stacks_info)
            measure_throughput(stacks, figures, inputs, reference, sizes)
            rate, basis = (args.rate, "--rate") if args.rate else auto_rate(figures)
            measure_latency(stacks, figures, inputs, reference, sizes, rate)
            for label, stack in stacks.items():
                stacks_info[label]["rss_mb_end"] = Memory.of(stack.tree()).rss_mb
        print()
        # Everything stops here: the naive paths below get the machine without idle workers.
    record_stops(stacks, stacks_info)
    for name in (p for p in NAIVE_PATHS if p in paths):
        print(f"\n[{name}: {sizes.naive} items, one at a time]", flush=True)
        figures[name] = PathFigures(name, name, naive=naive_path(name, url, inputs, reference, sizes.naive))
    return Outcome({p: figures[p] for p in PATHS if p in figures}, stacks_info, skipped, rate, basis)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    command = command_line("peers.py", argv)
    started = time.monotonic()
    source = source_state()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        log_dir = Path(tmp)
        print(f"[virtualenvs of the peers, under {args.venv_dir}]", flush=True)
        envs, skipped = prepare_envs(paths, args.venv_dir, log_dir)
        if args.prepare:
            return 1 if skipped else 0
        with contextlib.ExitStack() as stack:
            url, broker = open_broker(stack, args.broker)
            print(f"broker: {broker}; {os.cpu_count()} CPUs; sizes: {sizes}", flush=True)
            # As overhead.py: drop the failure's pending results while Redis still runs.
            code, outcome = run_guarded(lambda: run_paths(url, paths, sizes, args, envs, skipped, log_dir))
            if outcome is None:
                return code
    summary = report(outcome.figures, outcome.stacks_info, outcome.skipped, outcome.rate, outcome.rate_basis, sizes,
                     envs, args, broker, command)
    summary["source"] = source_after(source)
    summary["total_s"] = round(time.monotonic() - started, 1)
    print(f"total time: {summary['total_s']:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
