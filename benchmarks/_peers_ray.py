"""Ray Serve path of ``benchmarks/peers.py``: a local Ray cluster, the anchor MLP behind ``@serve.batch``, and
the client that drives it through a ``DeploymentHandle``.

Runs in a virtualenv of its own that ``benchmarks/peers.py`` creates (``ray[serve]`` and the same torch as
celery-gpu's; no Celery, no celery_gpu), as ``python -m benchmarks._peers_ray`` with the repository on
``PYTHONPATH``. It starts a local Ray cluster as its own children (``ray.init(num_cpus=...)``, no dashboard, no
HTTP proxy), deploys ``MLP`` (``num_replicas`` replicas of one CPU each, ``max_ongoing_requests`` per replica,
the model built once per replica) and then answers the driver's commands, one JSON object per line on stdin;
each reply is one line on stdout that starts with ``@@peers `` (Ray's own output goes to stderr):

- ``{"cmd": "warmup", "count": N}``: every input once, then N more items: the values, in order.
- ``{"cmd": "throughput", "count": N}``: N items sent as fast as possible (one ``handle.remote`` each), all
  awaited; the seconds from the first send to the last result, and the values.
- ``{"cmd": "open_loop", "rate": R, "count": N}``: item ``i`` is sent at ``i / R`` seconds; per item the
  seconds from that scheduled time to its result (``latencies_s``), how late it was sent (``lag_s``), the values.
- ``{"cmd": "stats", "replicas": N}``: the batches run and the items they held, summed over the replicas.
- ``{"cmd": "stop"}``: shut Serve and Ray down and exit.

Item ``i`` is input ``i % pool`` of :func:`benchmarks._overhead_model.make_inputs` (``pool`` from the command
line), so the driver can check every value against its own reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from importlib import metadata
from typing import Any

import ray
from ray import serve

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, infer_batch
from benchmarks._overhead_model import build_model, make_inputs

APP_NAME = "peers-mlp"
REPLY = "@@peers "


@serve.deployment
class MLP:
    """The anchor MLP, one per replica; requests of one item each, batched by ``@serve.batch``."""

    def __init__(self) -> None:
        self.model = build_model()  # also torch.set_num_threads(1) in this replica
        self.batches = 0
        self.items = 0

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=MAX_WAIT_MS / 1000)
    async def infer(self, xs: list[list[float]]) -> list[float]:
        self.batches += 1
        self.items += len(xs)
        return infer_batch(self.model, xs)

    async def __call__(self, x: list[float]) -> float:
        result: float = await self.infer(x)
        return result

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "batches": self.batches, "items": self.items}


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


async def send_all(handle: Any, items: list[Any]) -> list[Any]:
    """Every item at once (one request each), all awaited; the values in order."""
    responses = [handle.remote(x) for x in items]
    return list(await asyncio.gather(*responses))


async def open_loop(handle: Any, inputs: list[Any], rate: float, count: int) -> dict[str, Any]:
    """Item ``i`` sent at ``t0 + i / rate`` whatever came back; latency counted from the scheduled time."""
    loop = asyncio.get_running_loop()
    latencies = [0.0] * count
    lags = [0.0] * count
    values: list[Any] = [None] * count

    async def one(i: int, at: float, response: Any) -> None:
        values[i] = await response
        latencies[i] = time.perf_counter() - at

    pending = []
    t0 = time.perf_counter() + 0.05
    for i in range(count):
        at = t0 + i / rate
        wait = at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        lags[i] = time.perf_counter() - at
        pending.append(loop.create_task(one(i, at, handle.remote(inputs[i % len(inputs)]))))
    await asyncio.gather(*pending)
    return {"latencies_s": latencies, "lag_s": lags, "values": values}


async def serve_commands(handle: Any, inputs: list[list[float]]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return  # the driver went away
        command = json.loads(line)
        cmd = command["cmd"]
        gc.collect()  # as the benchmark's own client does before each run: no full collection inside a run
        gc.freeze()
        if cmd == "stop":
            return
        if cmd == "warmup":
            first = await send_all(handle, inputs)
            more = await send_all(handle, [inputs[i % len(inputs)] for i in range(int(command["count"]))])
            reply({"values": first + more})
        elif cmd == "throughput":
            items = [inputs[i % len(inputs)] for i in range(int(command["count"]))]
            started = time.perf_counter()
            values = await send_all(handle, items)
            reply({"seconds": time.perf_counter() - started, "values": values})
        elif cmd == "open_loop":
            reply(await open_loop(handle, inputs, float(command["rate"]), int(command["count"])))
        elif cmd == "stats":
            reply(await batch_stats(handle, int(command["replicas"])))
        else:
            reply({"error": f"unknown command {cmd!r}"})


async def batch_stats(handle: Any, replicas: int, timeout: float = 60.0) -> dict[str, Any]:
    """The batch counters of every replica (asked until each has answered), summed."""
    per_replica: dict[int, dict[str, int]] = {}
    deadline = time.monotonic() + timeout
    while len(per_replica) < replicas and time.monotonic() < deadline:
        for answer in await asyncio.gather(*[handle.stats.remote() for _ in range(4 * replicas)]):
            per_replica[answer["pid"]] = answer
    return {"batches": sum(a["batches"] for a in per_replica.values()),
            "items": sum(a["items"] for a in per_replica.values()), "replicas": len(per_replica)}


async def replica_pids(handle: Any, replicas: int, timeout: float = 120.0) -> list[int]:
    """Call ``pid`` until every replica has answered (each has built its model: ``__init__`` ran)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered")
        seen |= set(await asyncio.gather(*[handle.pid.remote() for _ in range(4 * replicas)]))
    return sorted(seen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the local Ray cluster announces")
    parser.add_argument("--max-ongoing", type=int, default=2 * BATCH_SIZE,
                        help="max_ongoing_requests per replica (Ray's default, 5, would cap every batch at 5)")
    parser.add_argument("--pool", type=int, default=32, help="distinct inputs, cycled through")
    parser.add_argument("--temp-dir", help="Ray's session directory (default: Ray's)")
    args = parser.parse_args()
    # A SIGTERM from the driver unwinds through the finally below: Serve and the cluster are shut down.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    inputs = make_inputs(args.pool)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=args.temp_dir)
    try:
        serve.start(proxy_location="Disabled")
        deployment = MLP.options(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                                 ray_actor_options={"num_cpus": 1})
        started = time.monotonic()
        handle = serve.run(deployment.bind(), name=APP_NAME, route_prefix=None)
        pids = asyncio.run(replica_pids(handle, args.replicas))
        reply({"ready": True, "deploy_s": time.monotonic() - started, "replica_pids": pids,
               "driver_pid": os.getpid(), "versions": {d: version(d) for d in ("ray", "torch", "numpy")},
               "settings": {"num_replicas": args.replicas, "max_ongoing_requests": args.max_ongoing,
                            "max_batch_size": BATCH_SIZE, "batch_wait_timeout_s": MAX_WAIT_MS / 1000,
                            "num_cpus": args.num_cpus, "replica_num_cpus": 1}})
        asyncio.run(serve_commands(handle, inputs))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
