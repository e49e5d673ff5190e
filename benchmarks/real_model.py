"""A real model end to end: all-MiniLM-L6-v2 embeddings of short sentences through celery-gpu and its alternatives.

The model and the celery-gpu worker are those of ``examples/embeddings`` (the batched task ``embeddings.embed``:
tokenization and one forward pass per batch of up to 64 sentences, 5 ms wait). The sentences are a fixed,
generated corpus (``examples.embeddings.corpus``, 8 to 14 words each), cycled through. Paths, each with the same
number of model processes (``--per-device``, 2) and one torch thread per process on the CPU:

1. ``in_process``: no Celery: the model on batches of 64 (the ceiling): in this process on a GPU; on the CPU in
   ``--per-device`` spawned processes of one torch thread each, fed batches from one queue.
2. ``celery_gpu_bulk``: the example's worker, items sent with ``embed.submit_many(items)`` (one message each).
3. ``celery_gpu_packed``: the same with ``submit_many(items, pack=64)``, where celery-gpu has packs (issue 18).
4. ``celery_gpu_delay``: the same worker, one ``embed.delay(text)`` per item.
5. ``plain_celery``: stock Celery prefork, spawned children, the model loaded in ``worker_process_init``, one
   sentence per task (``benchmarks._real_model_plain_app``).
6. ``ray_serve``: Ray Serve, ``@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)``, one replica per
   model process, in a virtualenv of its own built here (``benchmarks._peers_venvs``); skipped with the reason
   where it cannot be built (no registry) or on ``--devices cuda`` without it.

Per path: ``items_per_s`` (N items sent as fast as the client can and all awaited, in rounds whose order rotates;
the median round), ``cpu_ms_per_item`` by party (client, worker main process, its children, broker), ``p50_ms`` /
``p99_ms`` at a fixed rate (an open loop: item ``i`` sent at ``i / rate`` whatever came back; the rate is half of
the slowest Celery or Ray path's items/s unless ``--rate``), ``mean_batch``. Every output is compared with the
reference embeddings computed here (float32: within 1e-4); a mismatch fails the run. ``efficiency`` is the best
celery-gpu path's items/s over ``in_process`` (goal on a GPU: 0.85). The machine's load average before and after
is recorded: on a shared machine, read the ratios of one run rather than absolute figures.

Usage::

    python benchmarks/real_model.py [--quick] [--devices cpu|cuda] [--dtype float32|float16] [--broker URL]
                                    [--paths in_process,celery_gpu_bulk,...] [--rate R] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` and ``examples.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._peers_measure import PathFigures, rotate, settle  # noqa: E402
from benchmarks._peers_memory import Memory  # noqa: E402
from benchmarks._peers_stack import Stack  # noqa: E402
from benchmarks._peers_venvs import DEFAULT_VENV_DIR, PeerEnv, ReadyEnv, ensure_venv, torch_requirement  # noqa: E402
from benchmarks._real_model_paths import (  # noqa: E402
    GPU_QUEUE,
    PACK,
    TOLERANCE,
    InProcess,
    MiniLMRayStack,
    celery_gpu_stack,
    check_vectors,
    plain_stack,
    supports_pack,
)
from benchmarks._real_model_report import report  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    child_env,
    command_line,
    emit,
    exit_on_sigterm,
    open_broker,
    percentile,
    run_guarded,
    source_after,
    source_state,
    version,
)

PATHS = ("in_process", "celery_gpu_bulk", "celery_gpu_packed", "celery_gpu_delay", "plain_celery", "ray_serve")
BATCH = 64
MAX_WAIT_MS = 5.0
LOAD_FRACTION = 0.5


@dataclass(frozen=True)
class Sizes:
    items: int  # per throughput round and path
    rounds: int
    open_loop: int  # items per path at the fixed rate, all segments together
    segments: int
    warmup: int  # items after every sentence of the pool was seen once
    pool: int  # distinct sentences

    @classmethod
    def for_run(cls, quick: bool, device: str) -> Sizes:
        if device == "cuda":
            return cls(2048, 2, 600, 2, 256, 512) if quick else cls(6144, 3, 3000, 3, 512, 512)
        return cls(384, 2, 160, 2, 64, 256) if quick else cls(1024, 3, 600, 3, 128, 512)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--devices", choices=("cpu", "cuda"), default="cpu",
                        help="where every path runs the model (cuda: the first GPU)")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="float32")
    parser.add_argument("--broker", help="Redis URL (default: an embedded Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--per-device", type=int, default=2, help="model processes of every path (default 2)")
    parser.add_argument("--rate", type=float, help="items/s of the latency runs (default: half the slowest path)")
    parser.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR, help="where Ray's virtualenv is built")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    return args


def ray_env() -> PeerEnv:
    """Ray Serve with this environment's torch and transformers (the model's files come from here)."""
    reqs = ("ray[serve]==2.60.0", torch_requirement(), f"transformers=={version('transformers')}")
    return PeerEnv("ray-serve-minilm", reqs, "ray, ray.serve, torch, transformers", ("ray", "torch", "transformers"))


def reference_model(args: argparse.Namespace, sizes: Sizes) -> tuple[Any, Any, list[str]]:
    """The in-process model on the benchmark's device, the reference embeddings of the pool, the pool."""
    import numpy as np
    import torch

    from examples.embeddings.corpus import sentences
    from examples.embeddings.model import Embedder

    if args.devices == "cpu":
        torch.set_num_threads(1)
    embedder = Embedder("cuda:0" if args.devices == "cuda" else "cpu", args.dtype)
    pool = sentences(sizes.pool)
    reference = np.concatenate([embedder(pool[i:i + BATCH]) for i in range(0, len(pool), BATCH)])
    return embedder, reference, pool


@dataclass
class Setup:
    url: str
    args: argparse.Namespace
    sizes: Sizes
    log_dir: Path
    ray: ReadyEnv | None
    skipped: dict[str, str]


def start_stacks(stack: contextlib.ExitStack, setup: Setup, paths: list[str]) -> dict[str, Stack]:
    """Every worker (and the Ray cluster) that ``paths`` need, started; a peer that does not start is skipped."""
    args, stacks = setup.args, {}
    model_env = {"EMBED_DTYPE": args.dtype, "CELERY_GPU_CPU_THREADS": "1", "EMBED_BATCH": str(BATCH),
                 "EMBED_MAX_WAIT_MS": str(MAX_WAIT_MS), "EMBED_BROKER": setup.url, "EMBED_QUEUE": GPU_QUEUE}
    gpu_paths = [p for p in paths if p.startswith("celery_gpu")]
    if gpu_paths:
        devices = "0" if args.devices == "cuda" else "cpu"
        print(f"\n[celery-gpu worker ({devices} x {args.per_device}): {', '.join(gpu_paths)}]", flush=True)
        env = child_env(setup.url, CELERY_GPU_DEVICES=devices, CELERY_GPU_PER_DEVICE=str(args.per_device), **model_env)
        stacks["celery_gpu"] = stack.enter_context(celery_gpu_stack(
            env, gpu_paths, {"app": "examples.embeddings.worker", "CELERY_GPU_DEVICES": devices,
                             "CELERY_GPU_PER_DEVICE": args.per_device, "batch": BATCH, "max_wait_ms": MAX_WAIT_MS,
                             "pack": PACK if "celery_gpu_packed" in gpu_paths else None}, setup.log_dir))
    if "plain_celery" in paths:
        print("\n[plain Celery worker]", flush=True)
        env = child_env(setup.url, REAL_MODEL_DEVICE="cuda:0" if args.devices == "cuda" else "cpu", **model_env)
        stacks["plain_celery"] = stack.enter_context(plain_stack(env, args.per_device, setup.log_dir))
    if "ray_serve" in paths and setup.ray is not None:
        print("\n[Ray Serve]", flush=True)
        from examples.embeddings.model import model_dir

        ray_args = ["--replicas", str(args.per_device), "--num-cpus", str(max(2, args.per_device)), "--num-gpus",
                    str(1 / args.per_device if args.devices == "cuda" else 0), "--max-ongoing", str(2 * BATCH),
                    "--max-batch", str(BATCH), "--wait-ms", str(MAX_WAIT_MS), "--dtype", args.dtype,
                    "--pool", str(setup.sizes.pool)]
        try:
            stacks["ray_serve"] = stack.enter_context(MiniLMRayStack.started(
                setup.ray.python, setup.url, setup.log_dir, ray_args, EMBED_MODEL_DIR=str(model_dir())))
        except (RuntimeError, TimeoutError) as exc:
            setup.skipped["ray_serve"] = f"Ray Serve did not start: {exc}"
            print(f"  SKIPPED: {setup.skipped['ray_serve']}", flush=True)
    return stacks


def warm_up(stacks: dict[str, Stack], figures: dict[str, PathFigures], pool: list[str], reference: Any,
            sizes: Sizes, tolerance: float) -> None:
    """Every sentence of the pool once through every path, then ``sizes.warmup`` more; every output checked."""
    items = pool + [pool[i % len(pool)] for i in range(sizes.warmup)]
    for name, fig in figures.items():
        if fig.stack == "in_process":
            continue
        stack = stacks[fig.stack]
        if isinstance(stack, MiniLMRayStack):
            values = stack.warm_up(sizes.warmup)
        else:
            values = stack.throughput(name, items)[1]
        diff = check_vectors(f"{name} warm-up", values, reference, tolerance)
        print(f"  {name}: warmed up ({len(values)} items, largest difference {diff:.1e})", flush=True)


def measure(stacks: dict[str, Stack], figures: dict[str, PathFigures], in_process: InProcess | None, pool: list[str],
            reference: Any, sizes: Sizes, tolerance: float, diffs: dict[str, float]) -> None:
    """Throughput rounds, every path once per round, the order rotating."""
    items = [pool[i % len(pool)] for i in range(sizes.items)]
    for round_no in range(sizes.rounds):
        print(f"\n[throughput, round {round_no + 1}/{sizes.rounds}: {sizes.items} items per path]", flush=True)
        for name in rotate(list(figures), round_no):
            settle()
            if in_process is not None and name == "in_process":
                run = in_process.round(items, BATCH)
            else:
                run = stacks[figures[name].stack].measured(name, items)
            diffs[name] = max(diffs.get(name, 0.0), check_vectors(name, run.values, reference, tolerance))
            run.values = [None] * len(run.values)  # checked: only their count is kept (items/s)
            figures[name].rounds.append(run)
            batch = "" if run.mean_batch is None else f", mean batch {run.mean_batch:.1f}"
            print(f"  {name}: {len(items) / run.seconds:.1f} items/s ({run.seconds:.2f}s{batch}); CPU ms/item "
                  f"{run.cpu_ms_per_item}", flush=True)


def latency(stacks: dict[str, Stack], figures: dict[str, PathFigures], pool: list[str], reference: Any,
            sizes: Sizes, rate: float, tolerance: float) -> None:
    """The open loop at ``rate``, in segments whose path order rotates (not for in_process and packed)."""
    names = [n for n in figures if n not in ("in_process", "celery_gpu_packed")]
    per_segment = max(1, sizes.open_loop // sizes.segments)
    for segment in range(sizes.segments):
        print(f"\n[latency at {rate:g} items/s, segment {segment + 1}/{sizes.segments}: {per_segment} items per "
              f"path]", flush=True)
        for name in rotate(names, segment):
            settle()
            run = stacks[figures[name].stack].open_loop(name, pool, rate, per_segment)
            check_vectors(name, run.values, reference, tolerance)
            figures[name].latencies_s += run.latencies_s
            figures[name].lag_s += run.lag_s
            ordered = sorted(run.latencies_s)
            print(f"  {name}: p50 {1000 * statistics.median(ordered):.2f} ms, p99 "
                  f"{1000 * percentile(ordered, 0.99):.2f} ms, max send lag {1000 * max(run.lag_s):.1f} ms",
                  flush=True)


def auto_rate(figures: dict[str, PathFigures]) -> tuple[float, str]:
    """Half the slowest served path's items/s, rounded down to a multiple of 10 (of 1 below 20/s)."""
    served = {n: f.items_per_s for n, f in figures.items() if n not in ("in_process", "celery_gpu_packed")}
    slowest = min(served, key=lambda n: served[n])
    raw = LOAD_FRACTION * served[slowest]
    rate = float(int(raw // 10) * 10) if raw >= 20 else float(max(1, int(raw)))
    return rate, f"{LOAD_FRACTION:g} x {slowest} ({served[slowest]:.1f} items/s), rounded down"


def run_paths(setup: Setup, paths: list[str]) -> dict[str, Any]:
    args, sizes = setup.args, setup.sizes
    os.environ.update(OVERHEAD_BROKER=setup.url, EMBED_BROKER=setup.url, EMBED_QUEUE=GPU_QUEUE)  # for the clients
    embedder, reference, pool = reference_model(args, sizes)
    tolerance = TOLERANCE[args.dtype]
    figures: dict[str, PathFigures] = {}
    info: dict[str, Any] = {}
    diffs: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stacks = start_stacks(stack, setup, paths)
        if "celery_gpu_packed" in paths and "celery_gpu" in stacks and not supports_pack(
                stacks["celery_gpu"].tasks["celery_gpu_packed"]):  # type: ignore[attr-defined]
            setup.skipped["celery_gpu_packed"] = "this celery-gpu has no packed submit_many (issue 18)"
        for name in paths:
            label = "in_process" if name == "in_process" else ("celery_gpu" if name.startswith("celery_gpu") else name)
            if (label == "in_process" or label in stacks) and name not in setup.skipped:
                figures[name] = PathFigures(name, label)
        print("\n[warm-up]", flush=True)
        warm_up(stacks, figures, pool, reference, sizes, tolerance)
        for label, s in stacks.items():
            memory = Memory.of(s.tree(), s.root())
            info[label] = {"ready_s": round(s.ready_s, 1), "settings": s.settings, "rss_mb": memory.rss_mb,
                           "processes": memory.processes}
        in_process = None
        if "in_process" in figures:
            in_process = InProcess("cuda:0" if args.devices == "cuda" else "cpu", args.dtype, args.per_device,
                                   embedder)
            stack.callback(in_process.close)
        measure(stacks, figures, in_process, pool, reference, sizes, tolerance, diffs)
        rate, basis = (args.rate, "--rate") if args.rate else auto_rate(figures)
        latency(stacks, figures, pool, reference, sizes, rate, tolerance)
        print()
    for label, s in stacks.items():
        worker = getattr(s, "worker", None)
        info[label].update(stop_s=getattr(worker or s, "stop_s", None),
                           left_behind=getattr(worker or s, "left_behind", None))
    return {"figures": figures, "stacks": info, "rate": rate, "rate_basis": basis, "max_difference": diffs}


def prepare_ray(args: argparse.Namespace, paths: list[str], log_dir: Path, skipped: dict[str, str]) -> ReadyEnv | None:
    if "ray_serve" not in paths:
        return None
    if args.devices == "cuda":
        skipped["ray_serve"] = "not run on --devices cuda: its virtualenv would need a CUDA torch built here"
        return None
    print(f"[Ray Serve's virtualenv, under {args.venv_dir}]", flush=True)
    try:
        return ensure_venv(ray_env(), args.venv_dir, log_dir)
    except (RuntimeError, OSError) as exc:
        skipped["ray_serve"] = f"its virtualenv could not be built: {exc}"
        print(f"  SKIPPED: {skipped['ray_serve']}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = Sizes.for_run(args.quick, args.devices)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    started, load_before, source = time.monotonic(), os.getloadavg(), source_state()
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="real-model-") as tmp:
        ray = prepare_ray(args, paths, Path(tmp), skipped)
        with contextlib.ExitStack() as stack:
            url, broker = open_broker(stack, args.broker)
            print(f"broker: {broker}; {os.cpu_count()} CPUs; devices: {args.devices}; sizes: {sizes}", flush=True)
            setup = Setup(url, args, sizes, Path(tmp), ray, skipped)
            code, outcome = run_guarded(lambda: run_paths(setup, paths))
            if outcome is None:
                return code
    summary = report(outcome, args, sizes, skipped, broker, ray, command_line("real_model.py", argv))
    summary["machine"]["load_average"] = {"before": [round(v, 2) for v in load_before],
                                          "after": [round(v, 2) for v in os.getloadavg()]}
    summary["source"] = source_after(source)
    summary["total_s"] = round(time.monotonic() - started, 1)
    print(f"total time: {summary['total_s']:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
