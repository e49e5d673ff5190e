"""Can one celery-gpu worker feed a GPU? Items per second and CPU per item of every party, per path.

Two models: a no-op (each item comes back as it went: what is left is our own cost per item) and the anchor MLP
of ``benchmarks/overhead.py`` (512 -> 2048 -> 2048 -> 512, float32). Items are 1x512 float32, sent with the arrays
serializer (numpy arrays) and with JSON (nested lists); results are written with the arrays serializer. Paths:

1. ``delay``: a celery-gpu worker (``CELERY_GPU_DEVICES=cpu`` or ``0``, one device process), batched tasks
   ``@gpu.task(batch=64, max_wait_ms=5)`` (``benchmarks._feed_gpu_app``), one ``apply_async((x,))`` per item
   (``.delay(x)`` with the serializer named).
2. ``bulk``: the same worker, ``task.submit_many(items)`` (one message per item; ``pack=False`` where packs exist).
3. ``packed``: the same worker, ``task.submit_many(items, pack=--pack)`` where celery-gpu has packs (issue 18);
   reported ``absent`` (with null figures) where it has not.
4. ``plain_celery``: stock Celery prefork, 2 spawned children, the MLP built in ``worker_process_init``, one item
   per task (``benchmarks._feed_plain_app``).
5. ``in_process``: no Celery: the items through the model in batches of 64 in this process (the ceiling).

On each broker of ``--brokers`` (``embedded``: a Redis started here; ``redis``: ``--redis``; ``amqp``: RabbitMQ at
``--amqp`` with ``--redis`` as the result backend), every worker is started and warmed up, then per model and
serializer: throughput runs (N items sent as fast as the client can, all awaited; the paths' order rotating
between rounds, the median round counts), each with the CPU time of every party from ``/proc/<pid>/stat``:
this client, the worker's main process, its device processes (or prefork children), the broker (Redis's ``INFO
cpu``, plus the RabbitMQ server's process: shared with anything else using it); then p50/p99 at a fixed rate
(an open loop: item ``i`` sent at ``i / rate`` whatever came back; half the slowest path's items/s unless
``--rate``); then the idle latency: sequential single ``.delay(x).get()`` round trips of the no-op, celery-gpu and
plain Celery taking turns. Every output is checked (a no-op returns its item exactly; the MLP its reference sum).

The last line printed is one JSON object (also written to ``--out``): per broker the figures, and the headline
of the first broker (arrays serializer): ``packed_noop_items_per_s``, ``worker_cpu_us_per_item_packed``,
``worker_cpu_us_per_item_delay``, ``packed_mlp_ratio_vs_in_process``, ``packed_mlp_ratio_vs_plain_celery``,
``idle_latency_delta_ms`` (null where a path is absent), with the issue's targets and whether each is met.

Usage::

    python benchmarks/feed.py [--quick] [--devices cpu|cuda] [--out FILE] [--brokers embedded,redis,amqp]
                              [--redis URL] [--amqp URL] [--pack 256] [--rate R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._feed_model import (  # noqa: E402
    BACKEND_ENV,
    BATCH,
    BROKER_ENV,
    DEVICE_ENV,
    MAX_WAIT_MS,
    MODELS,
    SERIALIZERS,
    check,
    load_mlp,
    make_items,
    reference_sums,
)
from benchmarks._feed_paths import (  # noqa: E402
    GPU_APP,
    OPEN_LOOP_PATHS,
    PLAIN_APP,
    SERVED,
    WorkerStack,
    broker_probe,
    in_process,
    rabbitmq_pid,
    round_trips,
    senders,
    started,
    supports_pack,
)
from benchmarks._feed_report import TARGETS, Figures, group_summary, headline, table, targets_met  # noqa: E402
from benchmarks._peers_measure import rotate, settle  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    child_env,
    command_line,
    emit,
    exit_on_sigterm,
    machine,
    percentile,
    redact,
    run_guarded,
    source_after,
    source_state,
)

BROKERS = ("embedded", "redis", "amqp")
PLAIN_PROCESSES = 2
POOL = 32  # distinct items, cycled through
LOAD_FRACTION = 0.5


@dataclass(frozen=True)
class Sizes:
    noop_items: int  # per throughput run of a path, no-op model
    mlp_items: int  # the same, MLP
    rounds: int  # throughput rounds, the paths' order rotating
    open_loop: int  # items per path at the fixed rate
    round_trips: int  # sequential single-item round trips per path (idle latency)
    warmup: int  # items per path after every item of the pool was seen once

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        return cls(2000, 384, 1, 60, 40, 64) if quick else cls(5000, 1024, 3, 300, 150, 256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, the first broker only (about 2 min)")
    parser.add_argument("--devices", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--brokers", help=f"comma-separated subset of {','.join(BROKERS)} (default: embedded with "
                                          "--quick, all three without)")
    parser.add_argument("--redis", default=os.environ.get("FEED_REDIS", "redis://127.0.0.1:6379/10"),
                        help="the machine's Redis (broker of 'redis', result backend of 'amqp'; env FEED_REDIS)")
    parser.add_argument("--amqp", default=os.environ.get("FEED_AMQP", "amqp://guest:guest@127.0.0.1:5672//"),
                        help="RabbitMQ of 'amqp' (env FEED_AMQP)")
    parser.add_argument("--pack", type=int, default=256, help="items per message on the packed path")
    parser.add_argument("--rate", type=float, help="items/s of the open loop (default: half the slowest path)")
    parser.add_argument("--per-device", type=int, default=1, help="device processes of the celery-gpu worker")
    args = parser.parse_args(argv)
    args.brokers = (args.brokers or ("embedded" if args.quick else ",".join(BROKERS))).split(",")
    unknown = set(args.brokers) - set(BROKERS)
    if unknown:
        parser.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    return args


@dataclass
class Bench:
    """What one broker's run holds: the workers, the items and references, the figures."""

    gpu: WorkerStack
    plain: WorkerStack
    items: dict[str, list[Any]]  # serializer -> the pool of items
    sums: list[float]  # the MLP's reference output sum of each item
    rel: float  # relative tolerance of the MLP's sums
    pack: int
    figures: dict[str, dict[str, dict[str, Figures]]]  # model -> serializer -> path
    absent: dict[str, str]

    def stack(self, path: str) -> WorkerStack:
        return self.plain if path == "plain_celery" else self.gpu

    def served(self) -> list[str]:
        return [p for p in SERVED if p not in self.absent]


def warm_up(bench: Bench, count: int) -> None:
    """Every item of the pool once through every served path, model and serializer, then ``count`` more."""
    for model in MODELS:
        for ser, pool in bench.items.items():
            items = pool + [pool[i % len(pool)] for i in range(count)]
            for path in bench.served():
                run, values = bench.stack(path).measured(model, senders(ser, bench.pack)[path].many, items)
                check(f"{model}/{ser}/{path} warm-up", model, values, pool, bench.sums, bench.rel)
            print(f"  {model}/{ser}: warmed up", flush=True)


def throughput(bench: Bench, sizes: Sizes, mlp: Any, device: str) -> None:
    """Throughput rounds of every path, model and serializer; the in-process loop once per model and round."""
    for round_no in range(sizes.rounds):
        for model in MODELS:
            count = sizes.noop_items if model == "noop" else sizes.mlp_items
            for ser, pool in bench.items.items():
                items = [pool[i % len(pool)] for i in range(count)]
                print(f"\n[{model}/{ser}: {count} items per path, round {round_no + 1}/{sizes.rounds}]", flush=True)
                group = bench.figures[model][ser]
                for path in rotate(bench.served() + ["in_process"], round_no):
                    settle()
                    if path == "in_process":
                        run, values = in_process(model, mlp, device, items)
                    else:
                        run, values = bench.stack(path).measured(model, senders(ser, bench.pack)[path].many, items)
                    check(f"{model}/{ser}/{path}", model, values, pool, bench.sums, bench.rel)
                    group.setdefault(path, Figures()).runs.append(run)
                    batch = "" if run.mean_batch is None else f", batch {run.mean_batch:.1f}"
                    print(f"  {path}: {run.items_per_s:.1f} items/s ({run.seconds:.2f}s{batch}); CPU us/item "
                          f"{run.cpu_us}", flush=True)


def auto_rate(bench: Bench, model: str) -> float:
    """Half the slowest one-item path's items/s of ``model`` (any serializer), rounded down to a multiple of 10."""
    rates = [f.items_per_s for g in bench.figures[model].values() for p, f in g.items()
             if p in OPEN_LOOP_PATHS and f.items_per_s]
    raw = LOAD_FRACTION * min(r for r in rates if r is not None)
    return float(int(raw // 10) * 10) if raw >= 20 else float(max(1, int(raw)))


def open_loops(bench: Bench, sizes: Sizes, rate: float | None) -> dict[str, float]:
    """p50/p99 at a fixed rate per model, every one-item path and serializer."""
    rates = {}
    for model in MODELS:
        rates[model] = rate or auto_rate(bench, model)
        for ser, pool in bench.items.items():
            print(f"\n[{model}/{ser}: open loop at {rates[model]:g} items/s, {sizes.open_loop} items per path]",
                  flush=True)
            for path in OPEN_LOOP_PATHS:
                settle()
                one = senders(ser, bench.pack)[path].one
                assert one is not None
                run = bench.stack(path).open_loop(model, one, pool, rates[model], sizes.open_loop)
                check(f"{model}/{ser}/{path} open loop", model, run.values, pool, bench.sums, bench.rel)
                fig = bench.figures[model][ser].setdefault(path, Figures())
                fig.latencies_s += run.latencies_s
                fig.lag_s += run.lag_s
                ordered = sorted(run.latencies_s)
                print(f"  {path}: p50 {1000 * statistics.median(ordered):.2f} ms, p99 "
                      f"{1000 * percentile(ordered, 0.99):.2f} ms", flush=True)
    return rates


def idle_latency(bench: Bench, count: int) -> dict[str, Any]:
    """Single ``.delay(x).get()`` round trips of the no-op, celery-gpu and plain Celery taking turns."""
    out: dict[str, Any] = {}
    for ser, pool in bench.items.items():
        send = senders(ser, bench.pack)
        pair = {"delay": (bench.gpu, send["delay"]), "plain_celery": (bench.plain, send["plain_celery"])}
        round_trips(pair, "noop", pool, 5)
        times = round_trips(pair, "noop", pool, count)
        p50 = {p: 1000 * statistics.median(t) for p, t in times.items()}
        out[ser] = {"delay_p50_ms": round(p50["delay"], 3), "plain_celery_p50_ms": round(p50["plain_celery"], 3),
                    "delta_ms": round(p50["delay"] - p50["plain_celery"], 3)}
        print(f"  idle latency ({ser}): {out[ser]}", flush=True)
    return out


def run_broker(label: str, broker: str, backend: str, args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """Every measurement on one broker; its part of the JSON."""
    device = "cuda:0" if args.devices == "cuda" else "cpu"
    os.environ.update({BROKER_ENV: broker, BACKEND_ENV: backend, DEVICE_ENV: device})  # before the apps' import
    items = {ser: make_items(POOL, ser) for ser in SERIALIZERS}
    sums = reference_sums(items["arrays"])
    mlp = load_mlp(device)
    extra = {BROKER_ENV: broker, BACKEND_ENV: backend, DEVICE_ENV: device}
    with tempfile.TemporaryDirectory(prefix="feed-") as tmp, contextlib.ExitStack() as stack:
        print(f"\n[{label}: celery-gpu worker and plain Celery worker]", flush=True)
        gpu_env = child_env(broker, CELERY_GPU_DEVICES="0" if args.devices == "cuda" else "cpu",
                            CELERY_GPU_PER_DEVICE=str(args.per_device), **extra)
        gpu = stack.enter_context(started("feed-gpu", GPU_APP, [], gpu_env, args.per_device, True, Path(tmp)))
        plain = stack.enter_context(started("feed-plain", PLAIN_APP, ["--pool", "prefork", "--concurrency",
                                                                      str(PLAIN_PROCESSES)],
                                            child_env(broker, **extra), PLAIN_PROCESSES, False, Path(tmp)))
        probe = broker_probe(gpu.module.app, rabbitmq_pid() if label == "amqp" else None)
        gpu.probe = plain.probe = probe
        absent = {} if supports_pack(gpu.task("noop")) else {
            "packed": "this celery-gpu has no packed submission (submit_many(items, pack=...), issue 18)"}
        bench = Bench(gpu, plain, items, sums, 1e-3 if device != "cpu" else 1e-4, args.pack,
                      {m: {s: {} for s in SERIALIZERS} for m in MODELS}, absent)
        print("\n[warm-up]", flush=True)
        warm_up(bench, sizes.warmup)
        throughput(bench, sizes, mlp, device)
        rates = open_loops(bench, sizes, args.rate)
        print(f"\n[idle latency: {sizes.round_trips} round trips per path, taking turns]", flush=True)
        idle = idle_latency(bench, sizes.round_trips)
    workers = {s.label: {"ready_s": round(s.ready_s, 1), "stop_s": s.worker.stop_s,
                         "left_behind": s.worker.left_behind} for s in (gpu, plain)}
    paths = {m: {s: group_summary(g, absent) for s, g in by.items()} for m, by in bench.figures.items()}
    print("\n" + table(label, paths), flush=True)
    return {"broker": redact(broker), "backend": redact(backend), "paths": paths, "open_loop_rate": rates,
            "idle_latency": idle, "workers": workers}


def broker_urls(label: str, args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[str, str]:
    if label == "embedded":
        from celery_gpu.embedded import EmbeddedRedis

        url = stack.enter_context(EmbeddedRedis()).url
        return url, url
    if label == "redis":
        return args.redis, args.redis
    return args.amqp, args.redis


def run_each(args: argparse.Namespace, argv: list[str] | None, sizes: Sizes) -> dict[str, Any] | None:
    """Every broker of ``--brokers``: in this process when there is one, else each in a run of its own (an app's
    broker is fixed when it is imported)."""
    if len(args.brokers) == 1:
        label = args.brokers[0]
        with contextlib.ExitStack() as stack:
            broker, backend = broker_urls(label, args, stack)
            code, outcome = run_guarded(lambda: run_broker(label, broker, backend, args, sizes))
        return None if outcome is None else {label: outcome}
    parts: dict[str, Any] = {}
    given = [a for a in (sys.argv[1:] if argv is None else argv)]
    rest = [a for i, a in enumerate(given) if a != "--brokers" and (i == 0 or given[i - 1] != "--brokers")
            and not a.startswith("--brokers=") and a != "--out" and (i == 0 or given[i - 1] != "--out")]
    with tempfile.TemporaryDirectory(prefix="feed-parts-") as tmp:
        for label in args.brokers:
            out = Path(tmp) / f"{label}.json"
            done = subprocess.run([sys.executable, __file__, *rest, "--brokers", label, "--out", str(out)], cwd=REPO)
            if done.returncode != 0 or not out.exists():
                print(f"{label}: the run failed (exit {done.returncode})", file=sys.stderr)
                return None
            parts[label] = json.loads(out.read_text())["brokers"][label]
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    t0, load_before, source = time.monotonic(), os.getloadavg(), source_state()
    print(f"brokers: {', '.join(args.brokers)}; {os.cpu_count()} CPUs; devices: {args.devices}; sizes: {sizes}",
          flush=True)
    brokers = run_each(args, argv, sizes)
    if brokers is None:
        return 1
    head = headline(brokers[args.brokers[0]])
    summary: dict[str, Any] = {
        "benchmark": "feed", "quick": args.quick, "devices": args.devices, **head,
        "headline_from": f"{args.brokers[0]}, arrays serializer", "targets": TARGETS, "met": targets_met(head),
        "sizes": {**asdict(sizes), "batch": BATCH, "max_wait_ms": MAX_WAIT_MS, "pack": args.pack,
                  "per_device": args.per_device, "plain_concurrency": PLAIN_PROCESSES, "pool": POOL},
        "brokers": brokers, "machine": machine(), "command": command_line("feed.py", argv),
    }
    summary["machine"]["load_average"] = {"before": [round(v, 2) for v in load_before],
                                          "after": [round(v, 2) for v in os.getloadavg()]}
    summary["source"] = source_after(source)
    summary["total_s"] = round(time.monotonic() - t0, 1)
    print(f"\nheadline ({summary['headline_from']}): " + ", ".join(f"{k}={v}" for k, v in head.items()))
    print(f"targets met: {summary['met']}")
    print(f"total time: {summary['total_s']:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
