"""Ray Serve path of ``benchmarks/real_model.py``: a local Ray cluster, all-MiniLM-L6-v2 behind ``@serve.batch``,
and the client that drives it through a ``DeploymentHandle``.

Runs in a virtualenv of its own (``ray[serve]``, the same torch and transformers as celery-gpu's; no Celery) that
``real_model.py`` creates, as ``python -m benchmarks._real_model_ray`` with the repository on ``PYTHONPATH`` and
``EMBED_MODEL_DIR`` naming the model's files. The commands and replies are those of ``benchmarks._peers_ray``
(one JSON object per line; replies on stdout prefixed ``@@peers ``), except that embeddings travel as one base64
string of float32 rows (``values_f32``), so that the reply's encoding costs the client little CPU.

Item ``i`` is sentence ``i % pool`` of :func:`examples.embeddings.corpus.sentences`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import ray
from ray import serve

from benchmarks._peers_ray import batch_stats, open_loop, replica_pids, reply, send_all, version
from examples.embeddings.corpus import sentences
from examples.embeddings.model import Embedder

APP_NAME = "real-model-minilm"


@serve.deployment
class MiniLM:
    """The model, one per replica; requests of one sentence each, batched by ``@serve.batch``."""

    def __init__(self, device: str, dtype: str, max_batch: int, wait_s: float) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(1)
        self.embedder = Embedder(device, dtype)
        self.embedder(["warm-up"])
        self.batches = 0
        self.items = 0
        self.infer.set_max_batch_size(max_batch)
        self.infer.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def infer(self, texts: list[str]) -> list[list[float]]:
        self.batches += 1
        self.items += len(texts)
        return [v.tolist() for v in self.embedder(texts)]

    async def __call__(self, text: str) -> list[float]:
        result: list[float] = await self.infer(text)
        return result

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        return {"pid": os.getpid(), "batches": self.batches, "items": self.items}


def packed(values: list[Any]) -> str:
    """Embeddings as one base64 string of float32 rows."""
    return base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode()


async def serve_commands(handle: Any, inputs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return  # the driver went away
        command = json.loads(line)
        cmd = command["cmd"]
        gc.collect()  # no full collection inside a measured run
        gc.freeze()
        if cmd == "stop":
            return
        if cmd == "warmup":
            first = await send_all(handle, inputs)
            more = await send_all(handle, [inputs[i % len(inputs)] for i in range(int(command["count"]))])
            reply({"values_f32": packed(first + more)})
        elif cmd == "throughput":
            items = [inputs[i % len(inputs)] for i in range(int(command["count"]))]
            started = time.perf_counter()
            values = await send_all(handle, items)
            reply({"seconds": time.perf_counter() - started, "values_f32": packed(values)})
        elif cmd == "open_loop":
            answer = await open_loop(handle, inputs, float(command["rate"]), int(command["count"]))
            answer["values_f32"] = packed(answer.pop("values"))
            reply(answer)
        elif cmd == "stats":
            reply(await batch_stats(handle, int(command["replicas"])))
        else:
            reply({"error": f"unknown command {cmd!r}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the local Ray cluster announces")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (0: the CPU)")
    parser.add_argument("--max-ongoing", type=int, default=128, help="max_ongoing_requests per replica")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pool", type=int, default=512, help="distinct sentences, cycled through")
    parser.add_argument("--temp-dir", help="Ray's session directory (default: Ray's)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    inputs = sentences(args.pool)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=args.temp_dir)
    try:
        serve.start(proxy_location="Disabled")
        device = "cuda:0" if args.num_gpus else "cpu"
        deployment = MiniLM.options(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                                    ray_actor_options={"num_cpus": 1, "num_gpus": args.num_gpus})
        started = time.monotonic()
        handle = serve.run(deployment.bind(device, args.dtype, args.max_batch, args.wait_ms / 1000),
                           name=APP_NAME, route_prefix=None)
        pids = asyncio.run(replica_pids(handle, args.replicas))
        reply({"ready": True, "deploy_s": time.monotonic() - started, "replica_pids": pids,
               "driver_pid": os.getpid(),
               "versions": {d: version(d) for d in ("ray", "torch", "transformers", "numpy")},
               "settings": {"num_replicas": args.replicas, "max_ongoing_requests": args.max_ongoing,
                            "max_batch_size": args.max_batch, "batch_wait_timeout_s": args.wait_ms / 1000,
                            "num_cpus": args.num_cpus, "replica_num_cpus": 1, "replica_num_gpus": args.num_gpus,
                            "device": device, "dtype": args.dtype}})
        asyncio.run(serve_commands(handle, inputs))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
