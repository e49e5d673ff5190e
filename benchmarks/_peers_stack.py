"""What ``peers.py`` measures through: a ``Stack`` is a running worker (or Ray cluster) that serves one or more
paths, with its process tree, its client's and broker's CPU, its batch counters, a throughput round and an
open-loop segment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.harness import tree_cpu_s

PROCESSES = 2  # model processes of every worker: device processes, prefork children, Ray replicas
INPUT_POOL = 32  # distinct inputs, cycled through


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
