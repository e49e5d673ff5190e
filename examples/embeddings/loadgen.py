"""Load generator for the embedding service: many concurrent ``POST /embed`` requests, a progress bar, then the
throughput and the latency percentiles.

    python -m examples.embeddings.loadgen --url http://127.0.0.1:8000 --requests 2000 --concurrency 64

Each request carries ``--texts`` sentences of the generated corpus (``corpus.sentences``). With ``--rate R`` the
requests are sent at a fixed rate (an open loop: request ``i`` leaves at ``i / R`` seconds whatever has come
back, and its latency counts from then), else ``--concurrency`` requests are kept in flight (a closed loop).
Every answer is checked (status 200, one 384-float vector per text); failures are counted by status and shown.
``--json`` ends the output with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from typing import Any

import httpx

from .corpus import sentences
from .model import DIM


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.done == self.total):
            self._drawn = now
            width = 30
            filled = width * self.done // max(self.total, 1)
            rate = self.done / max(now - self.started, 1e-9)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} requests, "
                             f"{self.failed} failed, {rate:7.1f} req/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values (nearest rank)."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


async def one(client: httpx.AsyncClient, texts: list[str], at: float, latencies: list[float],
              statuses: Counter[str]) -> bool:
    """One request; its latency counts from ``at`` (its scheduled start)."""
    try:
        response = await client.post("/embed", json={"texts": texts})
    except httpx.HTTPError as exc:
        statuses[type(exc).__name__] += 1
        return False
    latencies.append(time.perf_counter() - at)
    ok = response.status_code == 200
    if ok:
        vectors = response.json()["embeddings"]
        ok = len(vectors) == len(texts) and all(len(v) == DIM for v in vectors)
    statuses[str(response.status_code) if ok or response.status_code != 200 else "bad body"] += 1
    return ok


async def run(url: str, requests: int, concurrency: int, per_request: int, rate: float | None,
              timeout: float, progress: Progress) -> dict[str, Any]:
    corpus = sentences(max(requests * per_request, 1))
    bodies = [corpus[i * per_request:(i + 1) * per_request] for i in range(requests)]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        if rate:  # open loop: request i leaves at started + i / rate
            tasks = []
            for i, texts in enumerate(bodies):
                at = started + i / rate
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                task = asyncio.create_task(one(client, texts, at, latencies, statuses))
                task.add_done_callback(lambda t: progress.step(t.result()))
                tasks.append(task)
            await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` requests in flight
            queue = iter(bodies)

            async def lane() -> None:
                for texts in queue:
                    progress.step(await one(client, texts, time.perf_counter(), latencies, statuses))

            await asyncio.gather(*(lane() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    ok = statuses.get("200", 0)
    return {"url": url, "requests": requests, "texts_per_request": per_request, "concurrency": concurrency,
            "rate": rate, "seconds": round(seconds, 3), "ok": ok, "statuses": dict(statuses),
            "requests_per_s": round(ok / seconds, 1), "texts_per_s": round(ok * per_request / seconds, 1),
            "p50_ms": round(1000 * statistics.median(ordered), 2) if ordered else None,
            "p99_ms": round(1000 * percentile(ordered, 0.99), 2) if ordered else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("-n", "--requests", type=int, default=1000)
    parser.add_argument("-c", "--concurrency", type=int, default=32, help="requests in flight (closed loop)")
    parser.add_argument("--texts", type=int, default=1, help="sentences per request")
    parser.add_argument("--rate", type=float, help="requests per second (open loop) instead of --concurrency")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.texts < 1 or (args.rate is not None and args.rate <= 0):
        parser.error("--requests, --concurrency, --texts and --rate must be positive")
    progress = Progress(args.requests)
    summary = asyncio.run(run(args.url, args.requests, args.concurrency, args.texts, args.rate, args.timeout,
                              progress))
    print(f"{summary['ok']}/{args.requests} requests answered in {summary['seconds']:.2f} s: "
          f"{summary['requests_per_s']:.1f} requests/s, {summary['texts_per_s']:.1f} texts/s; "
          f"latency p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms; statuses {summary['statuses']}")
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["ok"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
