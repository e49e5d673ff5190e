"""Many devices on one host: one worker for all of them, or one worker per device?

One celery-gpu worker has one main process: it receives, dispatches and acknowledges every item of every device.
Is it a cap? This measures ``fake:N`` devices (8 by default; fake devices run task code on the CPU, no GPU needed)
with the no-op batched task of ``benchmarks/feed.py`` (``batch=64``, items of 1x512 float32, arrays serializer),
served by each layout in turn:

- ``one``: one worker, ``CELERY_GPU_DEVICES=fake:N``, one device process per device (``celery-gpu worker --gpus
  all`` on an N-GPU host);
- ``two``: two workers of ``fake:N/2`` each;
- ``per_device``: N workers of ``fake:1`` each (one worker per GPU: ``--gpus 0``, ``--gpus 1``, ...).

Per layout and path (``delay``: one ``.delay`` per item; ``bulk``: ``submit_many``; ``packed``: ``submit_many(items,
pack=256)`` where celery-gpu has packs): items/s end to end and the CPU per item of this client, of the workers'
main processes together, of their device processes together, and of the broker; then the main processes' CPU per
item gives the rate one main process can feed at most (``main_cap_items_per_s`` = 1 s / its CPU per item, all its
CPU spent on the feed). The layouts take turns across rounds. The last line printed is one JSON object (also
written to ``--out``).

Usage::

    python benchmarks/topology.py [--quick] [--devices 8] [--broker URL] [--out FILE]
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._feed_model import BACKEND_ENV, BROKER_ENV, NOOP_ONLY_ENV, check, make_items  # noqa: E402
from benchmarks._feed_paths import GPU_APP, senders, supports_pack  # noqa: E402
from benchmarks._peers_measure import settle  # noqa: E402
from benchmarks._real_model_paths import wait_pool_ready  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Worker,
    celery_worker,
    child_env,
    collect,
    command_line,
    descendants,
    emit,
    exit_on_sigterm,
    machine,
    open_broker,
    proc_cpu_s,
    run_guarded,
    source_after,
    source_state,
)

PACK = 256


def layouts(devices: int) -> dict[str, list[int]]:
    """Layout -> the fake devices of each of its workers."""
    out = {"one": [devices]}
    if devices >= 4 and devices % 2 == 0:
        out["two"] = [devices // 2, devices // 2]
    out["per_device"] = [1] * devices
    return out


def cpu_now(workers: list[Worker], probe: Any) -> dict[str, float | None]:
    times = os.times()
    mains = sum(proc_cpu_s(w.proc.pid) for w in workers)
    devices = sum(proc_cpu_s(p) for w in workers for p in descendants(w.proc.pid))
    return {"client": times.user + times.system, "main": mains, "device": devices, "broker": probe()}


def measure(workers: list[Worker], task: Any, path: str, items: list[Any], pool: list[Any], probe: Any
            ) -> dict[str, Any]:
    settle()
    before = cpu_now(workers, probe)
    t0 = time.perf_counter()
    values = collect(senders("arrays", PACK)[path].many(task, items), workers[0])
    seconds = time.perf_counter() - t0
    after = cpu_now(workers, probe)
    check(path, "noop", values, pool, [], 0.0)
    cpu = {k: None if before[k] is None or after[k] is None else round(1e6 * (after[k] - before[k]) / len(items), 1)
           for k in before}  # type: ignore[operator]
    return {"items_per_s": round(len(items) / seconds, 1), "cpu_us_per_item": cpu}


def run_layout(name: str, spec: list[int], url: str, count: int, log_dir: Path) -> dict[str, Any]:
    """Start the layout's workers, warm them up, measure every path; stop them."""
    from benchmarks import _feed_gpu_app as app_module

    app_module.app.control.purge()
    pool = make_items(32, "arrays")
    items = [pool[i % len(pool)] for i in range(count)]
    task = app_module.noop
    paths = ["delay", "bulk"] + (["packed"] if supports_pack(task) else [])
    probe = _probe(app_module.app)
    with contextlib.ExitStack() as stack:
        workers = []
        for i, n in enumerate(spec):
            env = child_env(url, CELERY_GPU_DEVICES=f"fake:{n}", CELERY_GPU_PER_DEVICE="1",
                            **{BROKER_ENV: url, BACKEND_ENV: url, NOOP_ONLY_ENV: "1"})
            workers.append(stack.enter_context(celery_worker(GPU_APP, f"topo-{name}-{i}", [], env, log_dir)))
        for w in workers:
            wait_pool_ready(app_module.app, w)
        collect(senders("arrays", PACK)["bulk"].many(task, pool * 8), workers[0])  # warm every worker
        out = {path: measure(workers, task, path, items, pool, probe) for path in paths}
    for path, r in out.items():
        main = r["cpu_us_per_item"]["main"]
        r["main_cap_items_per_s"] = round(1e6 * len(spec) / main, 0) if main else None
        print(f"  {name} ({len(spec)} worker(s)) {path}: {r['items_per_s']} items/s; CPU us/item "
              f"{r['cpu_us_per_item']}", flush=True)
    return out


def _probe(app: Any) -> Any:
    def probe() -> float | None:
        try:
            info = app.backend.client.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:
            return None

    return probe


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per layout and path: the median round's items/s and CPU per item."""
    out: dict[str, Any] = {}
    for name, rounds in runs.items():
        out[name] = {}
        for path in rounds[0]:
            rates = [r[path]["items_per_s"] for r in rounds]
            mid = sorted(rounds, key=lambda r: r[path]["items_per_s"])[len(rounds) // 2][path]
            out[name][path] = {**mid, "rounds_items_per_s": rates, "items_per_s": statistics.median(rates)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2000 items, one round (about a minute)")
    parser.add_argument("--devices", type=int, default=8, help="fake devices (default 8)")
    parser.add_argument("--broker", help="Redis URL (default: an embedded Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    count, rounds = (2000, 1) if args.quick else (4000, 2)
    t0, source = time.monotonic(), source_state()
    plan = layouts(args.devices)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="topology-") as tmp:
        url, shown = open_broker(stack, args.broker)
        os.environ.update({BROKER_ENV: url, BACKEND_ENV: url})  # before the app's import
        print(f"broker: {shown}; {os.cpu_count()} CPUs; fake:{args.devices}; {count} items x {rounds} round(s)")

        def run() -> None:
            for round_no in range(rounds):
                order = list(plan) if round_no % 2 == 0 else list(reversed(plan))
                for name in order:
                    print(f"\n[{name}, round {round_no + 1}/{rounds}]", flush=True)
                    runs[name].append(run_layout(name, plan[name], url, count, Path(tmp)))

        code, _ = run_guarded(run)
        if code:
            return code
    layout_figures = summarize(runs)
    one = layout_figures["one"]
    summary = {
        "benchmark": "topology", "quick": args.quick, "devices": args.devices, "broker": shown,
        "layouts": {name: len(spec) for name, spec in plan.items()}, "items": count, "rounds": rounds,
        "figures": layout_figures,
        "per_device_over_one": {p: round(layout_figures["per_device"][p]["items_per_s"] / one[p]["items_per_s"], 3)
                                for p in one},
        "machine": machine(), "command": command_line("topology.py", argv), "source": source_after(source),
        "total_s": round(time.monotonic() - t0, 1),
    }
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
