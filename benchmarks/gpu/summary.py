"""The GPU check's summary: ``summary.json`` (every step and its figures) and ``summary.md`` (a short table) in
``$OUT``, from the files the steps of ``benchmarks/gpu/run.sh`` wrote.

    python benchmarks/gpu/summary.py OUT WORK MODE SECONDS

``WORK`` holds ``steps.tsv`` (name, exit status, seconds, limit per step) and pytest's ``junit.xml``.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

FEED_KEYS = ("packed_noop_items_per_s", "worker_cpu_us_per_item_packed", "worker_cpu_us_per_item_delay",
             "packed_mlp_ratio_vs_in_process", "packed_mlp_ratio_vs_plain_celery")


def load(path: Path) -> Any:
    """A JSON file, or the last line of one that ends with a JSON line; None when missing or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def steps(work: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        name, rc, seconds, limit = line.split("\t")
        status = {"0": "ok", "124": "out of time", "137": "killed", "skipped": "skipped"}.get(rc, f"failed ({rc})")
        if name == "feed" and rc == "3":
            status = "not present"
        rows.append({"step": name, "status": status, "seconds": int(seconds), "limit_s": int(limit)})
    return rows


def pytest_counts(work: Path) -> dict[str, Any] | None:
    try:
        root = ElementTree.parse(work / "junit.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def summarize(out: Path, work: Path, mode: str, seconds: int) -> dict[str, Any]:
    real = load(out / "real_model.json")
    feed = load(out / "feed.json")
    summary: dict[str, Any] = {
        "check": "benchmarks/gpu/run.sh", "mode": mode, "seconds": seconds, "steps": steps(work),
        "env": load(out / "env.json"), "pytest_gpu": pytest_counts(work), "bandwidth": load(out / "bandwidth.json"),
        "real_model": None if real is None else {
            k: real.get(k) for k in ("items_per_s", "efficiency", "efficiency_goal", "ratio_vs_plain_celery",
                                     "best_celery_gpu_path", "rate_per_s", "skipped", "dtype")} | {
            "p50_ms": {n: p["p50_ms"] for n, p in real["paths"].items()},
            "p99_ms": {n: p["p99_ms"] for n, p in real["paths"].items()},
            "cpu_ms_per_item": {n: p["cpu_ms_per_item"] for n, p in real["paths"].items()}},
        "feed": None if feed is None else {k: feed.get(k) for k in FEED_KEYS},
    }
    return summary


def markdown(s: dict[str, Any]) -> str:
    env = s["env"] or {}
    device = env.get("gpu") or "no GPU (dry run on the CPU)"
    lines = [f"# GPU check ({s['mode']}): {device}", "",
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}; "
             f"{env.get('nvidia_smi') or ''}; {s['seconds']} s in all", "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in s["steps"]]
    if s["pytest_gpu"]:
        p = s["pytest_gpu"]
        lines += ["", f"pytest tests/gpu: {p['tests']} tests, {p['failures'] + p['errors']} failed, "
                      f"{p['skipped']} skipped" + (f" ({', '.join(p['failed_tests'])})" if p["failed_tests"] else "")]
    if s["bandwidth"]:
        lines += ["", "| host -> device | pinned staging GB/s | plain .to() GB/s | ratio |", "|---|---:|---:|---:|"]
        lines += [f"| {r['mib']} MiB | {r['staged_gb_per_s']} | {r['plain_gb_per_s']} | {r['staged_over_plain']} |"
                  for r in s["bandwidth"]["sizes"]]
    if s["real_model"]:
        r = s["real_model"]
        lines += ["", f"| all-MiniLM-L6-v2 ({r['dtype']}) | items/s | p50 ms | p99 ms | CPU ms/item |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {v} | {r['p50_ms'].get(n)} | {r['p99_ms'].get(n)} | "
                  f"{(r['cpu_ms_per_item'].get(n) or {}).get('total')} |" for n, v in r["items_per_s"].items()]
        lines += ["", f"efficiency ({r['best_celery_gpu_path']} / in_process): {r.get('efficiency')} "
                      f"(goal 0.85); vs plain Celery: {r.get('ratio_vs_plain_celery')}; latency at "
                      f"{r.get('rate_per_s')} items/s"]
        lines += [f"- skipped {name}: {why}" for name, why in (r.get("skipped") or {}).items()]
    if s["feed"]:
        lines += ["", "feed.py: " + ", ".join(f"{k} {v}" for k, v in s["feed"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    out, work, mode, seconds = Path(argv[1]), Path(argv[2]), argv[3], int(argv[4])
    summary = summarize(out, work, mode, seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
