"""The summary of ``real_model.py``: per path figures, the ratios, the machine; and the same as a markdown table."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks._peers_measure import PathFigures
from benchmarks._peers_venvs import ReadyEnv
from benchmarks.harness import machine, percentile, version

EFFICIENCY_GOAL = 0.85  # best celery-gpu path / in-process loop, on a GPU


def _median_cpu(fig: PathFigures) -> dict[str, float | None]:
    parties = {k for r in fig.rounds for k in r.cpu_ms_per_item}
    out: dict[str, float | None] = {}
    for party in sorted(parties):
        values = [v for r in fig.rounds if (v := r.cpu_ms_per_item.get(party)) is not None]
        out[party] = round(statistics.median(values), 3) if values else None
    return out


def path_summary(fig: PathFigures, max_difference: float | None) -> dict[str, Any]:
    rates = [len(r.values) / r.seconds for r in fig.rounds if r.seconds > 0]
    batches = [r.mean_batch for r in fig.rounds if r.mean_batch is not None]
    ordered = sorted(fig.latencies_s)
    return {
        "items_per_s": round(fig.items_per_s, 1),
        "rounds_items_per_s": [round(v, 1) for v in rates],
        "cpu_ms_per_item": _median_cpu(fig),
        "mean_batch": round(statistics.median(batches), 1) if batches else None,
        "p50_ms": round(1000 * statistics.median(ordered), 2) if ordered else None,
        "p99_ms": round(1000 * percentile(ordered, 0.99), 2) if ordered else None,
        "send_lag_p99_ms": round(1000 * percentile(sorted(fig.lag_s), 0.99), 2) if fig.lag_s else None,
        "max_difference": max_difference,
    }


def device_info(devices: str) -> dict[str, Any]:
    info: dict[str, Any] = {"devices": devices}
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        info["cpu_model"] = model
    except (OSError, StopIteration):
        pass
    if devices == "cuda":
        import torch

        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def report(outcome: dict[str, Any], args: argparse.Namespace, sizes: Any, skipped: dict[str, str], broker: str,
           ray: ReadyEnv | None, command: str) -> dict[str, Any]:
    figures: dict[str, PathFigures] = outcome["figures"]
    paths = {name: path_summary(fig, outcome["max_difference"].get(name)) for name, fig in figures.items()}
    rate = {name: p["items_per_s"] for name, p in paths.items()}
    gpu_paths = {n: r for n, r in rate.items() if n.startswith("celery_gpu")}
    best = max(gpu_paths, key=lambda n: gpu_paths[n]) if gpu_paths else None
    summary: dict[str, Any] = {"benchmark": "real_model", "model": "sentence-transformers/all-MiniLM-L6-v2",
                               "dtype": args.dtype, "devices": args.devices, "quick": args.quick,
                               "sizes": vars(sizes), "broker": broker, "paths": paths,
                               "items_per_s": rate, "best_celery_gpu_path": best}
    if best is not None:
        for other in ("in_process", "plain_celery", "ray_serve"):
            if other in rate and rate[other]:
                key = "efficiency" if other == "in_process" else f"ratio_vs_{other}"
                summary[key] = round(rate[best] / rate[other], 3)
        if "efficiency" in summary:
            summary["efficiency_goal"] = {"goal": EFFICIENCY_GOAL, "met": summary["efficiency"] >= EFFICIENCY_GOAL,
                                          "applies": "on a GPU"}
    summary.update(rate_per_s=outcome["rate"], rate_basis=outcome["rate_basis"], skipped=skipped,
                   workers=outcome["stacks"], command=command)
    summary["machine"] = {**machine(), **device_info(args.devices), "transformers": version("transformers"),
                          "ray_env": ray.versions if ray else None}
    print(markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a short markdown table (one row per path)."""
    lines = [f"all-MiniLM-L6-v2 ({summary['dtype']}) on {summary['devices']}, {summary['broker']}; latency at "
             f"{summary['rate_per_s']:g} items/s", "",
             "| path | items/s | p50 ms | p99 ms | mean batch | CPU ms/item (total) | max diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in summary["paths"].items():
        def cell(v: Any) -> str:
            return "–" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)

        lines.append(f"| {name} | {cell(p['items_per_s'])} | {cell(p['p50_ms'])} | {cell(p['p99_ms'])} | "
                     f"{cell(p['mean_batch'])} | {cell(p['cpu_ms_per_item'].get('total'))} | "
                     f"{'–' if p['max_difference'] is None else format(p['max_difference'], '.1e')} |")
    extras = [f"{k} {summary[k]}" for k in ("efficiency", "ratio_vs_plain_celery", "ratio_vs_ray_serve")
              if k in summary]
    if extras:
        lines += ["", f"{summary['best_celery_gpu_path']}: " + ", ".join(extras)]
    for name, why in summary["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines)
