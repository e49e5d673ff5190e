"""Everything of the embedding service in one command, with no server to install: an embedded Redis (broker and
results), a celery-gpu worker and the API under uvicorn. Ctrl+C stops all three (the worker shuts down warm).

    python -m examples.embeddings.serve [--port 8000] [--gpus all|cpu|0,1] [--per-gpu 1]

For production run the worker and the API on their own, on a real broker (README.md in this folder).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

from celery_gpu.embedded import EmbeddedRedis


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the worker's warm shutdown; uvicorn's graceful one
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_health(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("the worker or the API exited while starting: see the lines above")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no healthy service at {url} after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpus", default=os.environ.get("CELERY_GPU_DEVICES", "all"),
                        help="devices of the worker: all (the CPU when there is no GPU), cpu, 0,1, fake:2 ...")
    parser.add_argument("--per-gpu", type=int, default=1, help="device processes per device")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        redis = stack.enter_context(EmbeddedRedis())
        env: dict[str, Any] = dict(os.environ, EMBED_BROKER=redis.url, EMBED_BACKEND=redis.url)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery_gpu.cli", "worker", "-A", "examples.embeddings.worker", "--gpus",
             args.gpus, "--per-gpu", str(args.per_gpu), "-l", "warning", "--without-mingle", "--without-gossip"],
            env=env, stdin=subprocess.DEVNULL)
        stack.callback(_stop, worker)
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.embeddings.api:app", "--host", args.host, "--port",
             str(args.port), "--log-level", "warning"], env=env, stdin=subprocess.DEVNULL)
        stack.callback(_stop, api, 15)
        url = f"http://{args.host}:{args.port}"
        print(f"starting: embedded Redis at {redis.url}, a worker on {args.gpus}, the API at {url} ...", flush=True)
        try:
            _wait_health(url, [worker, api])
            print(f"ready: {url}/docs  (python -m examples.embeddings.loadgen --url {url}); Ctrl+C stops",
                  flush=True)
            while worker.poll() is None and api.poll() is None:
                time.sleep(0.5)
            print("the worker or the API exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main())
