"""Measuring the paths of ``peers.py``: throughput rounds and open-loop latency segments whose path order
rotates, idle CPU, the naive paths, and the rate of the latency runs."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

from benchmarks._peers_ray_stack import RayStack
from benchmarks._peers_stack import Run, Stack
from benchmarks.harness import (
    PathResult,
    check_outputs,
    child_env,
    percentile,
    spawned_process_item,
    subprocess_item,
    time_items,
    tree_cpu_s,
)

BATCHING_PATHS = ("celery_gpu_bulk", "celery_gpu_delay", "celery_batches", "ray_serve")
LOAD_FRACTION = 0.5  # the open loop's rate: this share of the slowest batching path's items/s


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


@dataclass
class PathFigures:
    """Everything measured for one path."""

    name: str
    stack: str
    rounds: list[Run] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    naive: PathResult | None = None

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
    """``names`` rotated by ``turn``: each round or segment starts with the next path."""
    k = turn % len(names) if names else 0
    return names[k:] + names[:k]


def measure_throughput(stacks: dict[str, Stack], figures: dict[str, PathFigures], inputs: list[list[float]],
                       reference: list[float], sizes: Sizes) -> None:
    """``sizes.rounds`` throughput rounds, every path once per round, the order rotating."""
    names = list(figures)
    items = [inputs[i % len(inputs)] for i in range(sizes.items)]
    for round_no in range(sizes.rounds):
        print(f"\n[throughput, round {round_no + 1}/{sizes.rounds}: {sizes.items} items per path]", flush=True)
        for name in rotate(names, round_no):
            stack = stacks[figures[name].stack]
            settle()
            run = stack.measured(name, items)
            check_outputs(name, run.values, reference)
            figures[name].rounds.append(run)
            batch = "" if run.mean_batch is None else f", mean batch {run.mean_batch:.1f}"
            print(f"  {name}: {len(items) / run.seconds:.1f} items/s ({run.seconds:.2f}s{batch}); CPU ms/item "
                  f"{run.cpu_ms_per_item}", flush=True)


def measure_latency(stacks: dict[str, Stack], figures: dict[str, PathFigures], inputs: list[list[float]],
                    reference: list[float], sizes: Sizes, rate: float) -> None:
    """The open loop at ``rate`` in ``sizes.segments`` segments, every path once per segment, the order rotating
    (not the packed path: one item at a time, a pack of one is the bulk path)."""
    names = [n for n in figures if n != "celery_gpu_packed"]
    per_segment = max(1, sizes.open_loop // sizes.segments)
    for segment in range(sizes.segments):
        print(f"\n[latency at {rate:g} items/s, segment {segment + 1}/{sizes.segments}: {per_segment} items per "
              f"path]", flush=True)
        for name in rotate(names, segment):
            settle()
            run = stacks[figures[name].stack].open_loop(name, inputs, rate, per_segment)
            check_outputs(name, run.values, reference)
            figures[name].latencies_s += run.latencies_s
            figures[name].lag_s += run.lag_s
            ordered = sorted(run.latencies_s)
            print(f"  {name}: p50 {1000 * statistics.median(ordered):.2f} ms, "
                  f"p99 {1000 * percentile(ordered, 0.99):.2f} ms, "
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
               ) -> PathResult:
    """A naive path (``overhead.py``'s): ``count`` items one at a time, every output checked."""
    run_one = subprocess_item(child_env(url)) if name == "subprocess" else spawned_process_item()
    result = time_items(name, run_one, inputs, count)
    check_outputs(name, [result.outputs[i] for i in sorted(result.outputs)], reference)
    return result


def auto_rate(figures: dict[str, PathFigures]) -> tuple[float, str]:
    """Half the slowest batching path's items/s, rounded down to a multiple of 10 (of 1 below 20/s)."""
    batching_rates = {n: f.items_per_s for n, f in figures.items() if n in BATCHING_PATHS and f.rounds}
    pool = batching_rates or {n: f.items_per_s for n, f in figures.items() if f.rounds}
    slowest = min(pool, key=lambda n: pool[n])
    raw = LOAD_FRACTION * pool[slowest]
    rate = float(int(raw // 10) * 10) if raw >= 20 else float(max(1, int(raw)))
    return rate, f"{LOAD_FRACTION:g} x {slowest} ({pool[slowest]:.1f} items/s), rounded down"
