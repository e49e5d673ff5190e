"""The summary of ``feed.py``: per broker, model, serializer and path the figures, the ratios to plain Celery and
to the in-process loop; the headline figures of the issue's targets; a table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks._feed_paths import PATHS, Run
from benchmarks.harness import percentile

#: The issue's targets on a 2-core machine (client, broker and worker on it).
TARGETS = {"packed_noop_items_per_s": 10_000.0, "worker_cpu_us_per_item_packed": 50.0,
           "worker_cpu_us_per_item_delay": 300.0, "packed_mlp_ratio_vs_in_process": 0.5,
           "packed_mlp_ratio_vs_plain_celery": 20.0, "idle_latency_delta_ms": 1.0}
AT_MOST = ("worker_cpu_us_per_item_packed", "worker_cpu_us_per_item_delay", "idle_latency_delta_ms")


@dataclass
class Figures:
    """Everything measured for one path of one model and serializer."""

    runs: list[Run] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)

    @property
    def items_per_s(self) -> float | None:
        return statistics.median(r.items_per_s for r in self.runs) if self.runs else None

    def summary(self) -> dict[str, Any]:
        parties = sorted({k for r in self.runs for k in r.cpu_us})
        cpu = {}
        for party in parties:
            values = [v for r in self.runs if (v := r.cpu_us.get(party)) is not None]
            cpu[party] = round(statistics.median(values), 1) if values else None
        batches = [r.mean_batch for r in self.runs if r.mean_batch is not None]
        ordered = sorted(self.latencies_s)
        rate = self.items_per_s
        return {"items_per_s": None if rate is None else round(rate, 1),
                "runs_items_per_s": [round(r.items_per_s, 1) for r in self.runs], "cpu_us_per_item": cpu,
                "mean_batch": round(statistics.median(batches), 1) if batches else None,
                "p50_ms": round(1000 * statistics.median(ordered), 2) if ordered else None,
                "p99_ms": round(1000 * percentile(ordered, 0.99), 2) if ordered else None,
                "send_lag_p99_ms": round(1000 * percentile(sorted(self.lag_s), 0.99), 2) if self.lag_s else None}


def group_summary(group: dict[str, Figures], absent: dict[str, str]) -> dict[str, Any]:
    """The paths of one model and serializer, each with its ratios to plain Celery and to the in-process loop."""
    out: dict[str, Any] = {}
    base = {k: group[k].items_per_s if k in group else None for k in ("plain_celery", "in_process")}
    for path in PATHS:
        if path in absent:
            out[path] = {"absent": absent[path]}
            continue
        if path not in group:
            continue
        entry = group[path].summary()
        for key, rate in (("ratio_vs_plain_celery", base["plain_celery"]), ("ratio_vs_in_process", base["in_process"])):
            entry[key] = None if not rate or entry["items_per_s"] is None else round(entry["items_per_s"] / rate, 3)
        out[path] = entry
    return out


def _get(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def headline(broker: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures, from one broker's results (the arrays serializer): null where a path is absent."""
    paths = broker["paths"]

    def path(model: str, name: str, *keys: str) -> Any:
        return _get(paths, model, "arrays", name, *keys)

    return {
        "packed_noop_items_per_s": path("noop", "packed", "items_per_s"),
        "bulk_noop_items_per_s": path("noop", "bulk", "items_per_s"),
        "delay_noop_items_per_s": path("noop", "delay", "items_per_s"),
        "plain_noop_items_per_s": path("noop", "plain_celery", "items_per_s"),
        "worker_cpu_us_per_item_packed": path("noop", "packed", "cpu_us_per_item", "worker"),
        "worker_cpu_us_per_item_bulk": path("noop", "bulk", "cpu_us_per_item", "worker"),
        "worker_cpu_us_per_item_delay": path("noop", "delay", "cpu_us_per_item", "worker"),
        "worker_cpu_us_per_item_delay_json": _get(paths, "noop", "json", "delay", "cpu_us_per_item", "worker"),
        "worker_cpu_us_per_item_plain_celery": path("noop", "plain_celery", "cpu_us_per_item", "worker"),
        "packed_mlp_ratio_vs_in_process": path("mlp", "packed", "ratio_vs_in_process"),
        "packed_mlp_ratio_vs_plain_celery": path("mlp", "packed", "ratio_vs_plain_celery"),
        "bulk_mlp_ratio_vs_in_process": path("mlp", "bulk", "ratio_vs_in_process"),
        "bulk_mlp_ratio_vs_plain_celery": path("mlp", "bulk", "ratio_vs_plain_celery"),
        "idle_latency_delta_ms": _get(broker, "idle_latency", "arrays", "delta_ms"),
        "idle_latency_delta_ms_json": _get(broker, "idle_latency", "json", "delta_ms"),
    }


def targets_met(head: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: met, not met, or None (its path absent)."""
    met: dict[str, bool | None] = {}
    for key, goal in TARGETS.items():
        value = head.get(key)
        met[key] = None if value is None else (value <= goal if key in AT_MOST else value >= goal)
    return met


def table(broker_label: str, paths: dict[str, Any]) -> str:
    """The figures of one broker as text: one line per model, serializer and path."""
    lines = [f"[{broker_label}]",
             f"{'model':<5} {'ser':<6} {'path':<13} {'items/s':>9} {'xplain':>7} {'xinproc':>8} {'batch':>6} "
             f"{'client':>7} {'main':>7} {'device':>7} {'broker':>7} {'p50ms':>7} {'p99ms':>7}  (CPU us/item)"]

    def cell(value: Any, width: int, digits: int = 1) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for model, by_ser in paths.items():
        for ser, group in by_ser.items():
            for name, e in group.items():
                if "absent" in e:
                    lines.append(f"{model:<5} {ser:<6} {name:<13} absent: {e['absent']}")
                    continue
                cpu = e["cpu_us_per_item"]
                lines.append(
                    f"{model:<5} {ser:<6} {name:<13} {cell(e['items_per_s'], 9)} "
                    f"{cell(e['ratio_vs_plain_celery'], 7, 2)} {cell(e['ratio_vs_in_process'], 8, 3)} "
                    f"{cell(e['mean_batch'], 6)} {cell(cpu.get('client'), 7)} "
                    f"{cell(cpu.get('worker_main'), 7)} {cell(cpu.get('worker_children'), 7)} "
                    f"{cell(cpu.get('broker'), 7)} {cell(e['p50_ms'], 7, 2)} {cell(e['p99_ms'], 7, 2)}")
    return "\n".join(lines)
