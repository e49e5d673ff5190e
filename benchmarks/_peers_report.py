"""The report of ``peers.py``: the table it prints and the final JSON object (per path, the summaries, the
ratios of the best celery-gpu path over each peer, the workers, the machine)."""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path
from typing import Any

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS
from benchmarks._peers_measure import PathFigures, Sizes
from benchmarks._peers_memory import kb_line
from benchmarks._peers_stack import PROCESSES, Run
from benchmarks._peers_venvs import ReadyEnv
from benchmarks.harness import machine, percentile, version


def machine_info(envs: dict[str, ReadyEnv]) -> dict[str, Any]:
    """``harness.machine()`` with the CPU model, the memory, kombu's version and the peers' versions."""
    info = machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    info["memory_gib"] = round(kb_line(Path("/proc/meminfo"), "MemTotal") / 2**20, 1) or None
    info["kombu"] = version("kombu")
    info["peers"] = {path: env.versions for path, env in envs.items()}
    return info


def path_entry(f: PathFigures, info: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """The JSON of one path (``info``: its worker's, from ``stacks_info``)."""
    entry: dict[str, Any] = {"items_per_s": round(f.items_per_s, 2), "worker": f.stack}
    if f.naive is not None:
        entry.update(p50_ms=round(f.naive.p50_ms, 1), p99_ms=None, latency="one item at a time, idle machine: "
                     "interpreter start, import torch, build the model, one input", note=f.naive.note)
        return entry
    ordered = sorted(f.latencies_s)
    entry.update(
        rounds_items_per_s=[round(len(r.values) / r.seconds, 2) for r in f.rounds],
        best_items_per_s=round(max(len(r.values) / r.seconds for r in f.rounds), 2),
        mean_batch=_median([r.mean_batch for r in f.rounds]),
        p50_ms=round(1000 * statistics.median(ordered), 3) if ordered else None,
        p99_ms=round(1000 * percentile(ordered, 0.99), 3) if ordered else None,
        p90_ms=round(1000 * percentile(ordered, 0.9), 3) if ordered else None,
        max_ms=round(1000 * ordered[-1], 3) if ordered else None,
        latency_items=len(ordered),
        send_lag_p99_ms=round(1000 * percentile(sorted(f.lag_s), 0.99), 3) if f.lag_s else None,
        load=round(rate / f.items_per_s, 3) if rate else None,
        cpu_ms_per_item=_median_cpu(f.rounds),
    )
    entry.update({k: info[k] for k in ("rss_mb", "pss_mb", "processes", "rss_breakdown_mb", "idle_cpu_pct")
                  if k in info})
    return entry


GPU_PATHS = ("celery_gpu_packed", "celery_gpu_bulk", "celery_gpu_delay")


def best_gpu_path(figures: dict[str, PathFigures]) -> str | None:
    """The celery-gpu path of the most items/s in this run (packed, where celery-gpu has packs), or None."""
    ran = [p for p in GPU_PATHS if p in figures and figures[p].rounds]
    return max(ran, key=lambda p: figures[p].items_per_s) if ran else None


def ratio(figures: dict[str, PathFigures], other: str) -> float | None:
    """The best celery-gpu path's items/s over ``other``'s, or None when either did not run."""
    best = best_gpu_path(figures)
    if best is None or other not in figures:
        return None
    return round(figures[best].items_per_s / figures[other].items_per_s, 3)


def cpu_ratio(paths: dict[str, dict[str, Any]], other: str, best: str | None) -> float | None:
    """The other path's CPU ms per item (every party: worker, client, broker) over the best celery-gpu path's:
    less sensitive to other load on a shared machine than items/s."""
    mine = (paths.get(best or "") or {}).get("cpu_ms_per_item", {}).get("total")
    theirs = (paths.get(other) or {}).get("cpu_ms_per_item", {}).get("total")
    return round(theirs / mine, 3) if mine and theirs else None


def print_table(paths: dict[str, dict[str, Any]], figures: dict[str, PathFigures], skipped: dict[str, str]) -> None:
    """One line per path (and per skipped path)."""
    print()
    print(f"{'path':<18} {'items/s':>9} {'best/x':>7} {'batch':>6} {'p50 ms':>8} {'p99 ms':>9} {'load':>5} "
          f"{'RSS MB':>8} {'PSS MB':>8} {'CPU ms/item':>11}")
    print("-" * 101)

    def cell(value: Any, width: int, digits: int = 2) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for name, e in paths.items():
        cpu = (e.get("cpu_ms_per_item") or {}).get("total")
        print(f"{name:<18} {e['items_per_s']:>9.1f} {cell(ratio(figures, name), 7)} "
              f"{cell(e.get('mean_batch'), 6, 1)} {cell(e.get('p50_ms'), 8)} "
              f"{cell(e.get('p99_ms'), 9)} {cell(e.get('load'), 5)} {cell(e.get('rss_mb'), 8, 0)} "
              f"{cell(e.get('pss_mb'), 8, 0)} {cell(cpu, 11, 3)}")
    for name, reason in skipped.items():
        print(f"{name:<18} SKIPPED: {reason}")


def report(figures: dict[str, PathFigures], stacks_info: dict[str, dict[str, Any]], skipped: dict[str, str],
           rate: float | None, rate_basis: str | None, sizes: Sizes, envs: dict[str, ReadyEnv],
           args: argparse.Namespace, broker: str, command: str) -> dict[str, Any]:
    """Print the table and build the JSON summary."""
    paths = {name: path_entry(f, stacks_info.get(f.stack, {}), rate) for name, f in figures.items()}
    print_table(paths, figures, skipped)
    best = best_gpu_path(figures)
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
        "best_celery_gpu_path": best,  # the ratios below are of this path
        "ratio_vs_celery_batches": ratio(figures, "celery_batches"),
        "ratio_vs_ray_serve": ratio(figures, "ray_serve"),
        "ratio_vs_plain_celery": ratio(figures, "plain_celery"),
        "cpu_ratio_vs_celery_batches": cpu_ratio(paths, "celery_batches", best),
        "cpu_ratio_vs_ray_serve": cpu_ratio(paths, "ray_serve", best),
        "cpu_ratio_vs_plain_celery": cpu_ratio(paths, "plain_celery", best),
        "ratio_vs_subprocess": ratio(figures, "subprocess"),
        "ratio_vs_process": ratio(figures, "process"),
        "workers": stacks_info,
        "outputs_checked": True,  # every output matched the reference computed here, or the run failed
        "command": command,
    }
    print()
    for other in ("celery_batches", "ray_serve", "plain_celery"):
        value = summary[f"ratio_vs_{other}"]
        cpu = summary[f"cpu_ratio_vs_{other}"]
        print(f"{best} items/s / {other}: {'-' if value is None else f'{value:.2f}x'}; "
              f"{other} CPU per item / {best}'s: {'-' if cpu is None else f'{cpu:.2f}x'}")
    return summary


def _median(values: list[float | None]) -> float | None:
    """The median of the values that are not None, rounded to 2 digits; None when there are none."""
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
