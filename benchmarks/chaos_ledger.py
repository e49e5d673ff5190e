"""Never twice, never lost, never down (issue 17): faults injected into real workers, an append-only ledger of
every execution of task code (``tests.apps.chaos``: one line per start, written before any work), on Redis and
RabbitMQ. No GPU needed (fake devices).

Scenarios, each on both brokers:

* ``drop`` (item 1): the broker connection lost mid-run, ``faults`` times: Redis is restarted (a redis-server
  of our own, AOF on, ``appendfsync always``); RabbitMQ (shared: never restarted) is reached through a
  ``socat`` relay whose connections are all dropped, then accepted again. Results go to another Redis of
  our own, which stays up (a result store that fails under a running task loses that result, as in stock
  Celery without ``result_backend_always_retry``: not what is measured here).
* ``kills`` (item 2): the worker's main process SIGKILLed at random moments (``kills`` times), a new worker
  started after each. Before each kill the main process is frozen at random moments, up to 10 times, and the
  broker read: the kill lands at the first freeze where a task is in no list, no unacked entry and has no
  result (kombu's ``BRPOP`` window, Redis), else at the last one.
* ``garbage`` (item 3): raw bytes, JSON that is no envelope and an envelope without ``properties`` put in the
  queue around good tasks.
* ``link_cut`` (item 7): workers on two hosts (network namespaces), one cut off for ``cut_s`` seconds mid-run
  (``tests/chaos/hosts.py``); skipped, with the reason, where namespaces cannot be made.

Per scenario and in total: ``lost`` (tasks without a successful result at the end), ``run_twice`` (tasks the
ledger shows started more than once), ``in_flight_at_faults`` (messages the worker held, received and not
acked, at each fault: Redis from the owners' hash, RabbitMQ from ``rabbitmqctl``; for ``link_cut``, what
the cut host held), ``running_at_faults`` (tasks started before a fault whose result was stored after it),
``worker_exits`` (workers that exited by themselves), ``orphans`` (device processes alive 10 s after their
main process was killed).

Usage::

    python benchmarks/chaos_ledger.py [--quick] [--only kills,drop] [--out results.json]

Brokers: ``CELERY_GPU_TEST_AMQP`` (RabbitMQ, vhost included; default the machine's ``/``); Redis is always a
redis-server of the script's own (``redis-server`` on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` and ``tests.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.harness import command_line, emit, machine  # noqa: E402
from benchmarks.harness.run import source_state  # noqa: E402
from celery_gpu.worker.consumer.inflight import OWNERS  # noqa: E402
from tests.brokers import Broker  # noqa: E402
from tests.chaos.hosts import Hosts, OwnRedis, Relay, cut_scenario, free_port, unavailable  # noqa: E402
from tests.worker import Worker, alive, wait_until  # noqa: E402

APP = "tests.apps.chaos"
BROKERS = ("redis", "rabbitmq")
FIGURES = ("lost", "run_twice", "in_flight_at_faults", "worker_exits", "orphans")
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class Run:
    """Workers of one scenario on one broker, their ledgers, the tasks sent."""

    def __init__(self, broker: Broker, tmp: Path, env: dict[str, str]) -> None:
        self.broker, self.tmp, self.env = broker, tmp / f"run-{os.urandom(3).hex()}", env
        self.tmp.mkdir()
        self.queue = f"q-chaos-{os.urandom(4).hex()}"
        self.workers: list[Worker] = []
        self.ids: list[str] = []
        self.exits = 0

    def start(self, devices: str = "fake:2") -> Worker:
        env = {"TEST_LEDGER": str(self.tmp / f"ledger-{len(self.workers)}.jsonl"), **self.env}
        w = Worker(self.broker, self.tmp, devices=devices, app_module=APP, extra_env=env, queue=self.queue).start()
        self.workers.append(w)
        w.wait_ready(timeout=90)
        return w

    def send(self, n: int, pause: float) -> None:
        client = self.workers[0].app
        single = client.signature(f"{APP}.single")
        base = len(self.ids)
        self.ids += [single.clone(args=(base + i,), kwargs={"pause": pause}).apply_async().id for i in range(n)]

    def metas(self) -> dict[str, dict[str, Any]]:
        """Task id -> its stored result meta (read straight from the backend's Redis: the client's result
        consumer gives up on a Redis that restarts)."""
        import redis

        r = redis.Redis.from_url(self.broker.backend_url)
        try:
            ids = self.ids
            metas: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                for task_id, raw in zip(chunk, r.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True):
                    if raw is not None:
                        metas[task_id] = json.loads(raw)
            return metas
        except redis.RedisError:
            return {}
        finally:
            r.close()

    def pending(self) -> int:
        metas = self.metas()
        return sum(metas.get(i, {}).get("status") not in ("SUCCESS", "FAILURE") for i in self.ids)

    def starts(self) -> dict[str, list[float]]:
        """Task id -> the times it was started (every ledger)."""
        runs: dict[str, list[float]] = {}
        for path in self.tmp.glob("ledger-*.jsonl"):
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                for task_id in entry["ids"]:
                    runs.setdefault(task_id, []).append(entry["t"])
        return runs

    def figures(self, faults: list[float], wait: float, held: list[int]) -> dict[str, Any]:
        """Wait up to ``wait`` s for every task, then count (``faults``: the times of the faults, ``held``:
        what the worker held at each)."""
        wait_until(lambda: self.pending() == 0, wait)
        starts = self.starts()
        done: dict[str, float] = {}
        lost = 0
        metas = self.metas()
        for task_id in self.ids:
            meta = metas.get(task_id, {})
            if meta.get("status") != "SUCCESS":
                lost += 1
            elif meta.get("date_done"):
                done[task_id] = _timestamp(meta["date_done"])
        running = sum(1 for t in faults for task_id, ts in starts.items()
                      if min(ts) <= t < done.get(task_id, float("inf")))
        return {"tasks": len(self.ids), "faults": len(faults), "lost": lost,
                "run_twice": sum(len(ts) > 1 for ts in starts.values()),
                "in_flight_at_faults": sum(max(h, 0) for h in held), "running_at_faults": running,
                "worker_exits": self.exits, "orphans": 0}

    def held(self, w: Worker) -> int:
        """Messages ``w`` holds now (received, not acked): on Redis its entries in the owners' hash, on
        RabbitMQ the queue's unacknowledged messages (``rabbitmqctl``; -1 where it cannot be asked)."""
        if self.broker.name == "redis":
            import redis

            r = redis.Redis.from_url(self.broker.broker_url)
            try:
                return sum(v.decode() == w.name for v in r.hvals(OWNERS))
            finally:
                r.close()
        vhost = unquote(urlsplit(self.broker.broker_url).path[1:]) or "/"
        try:
            out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name",
                                  "messages_unacknowledged"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return -1
        for line in out.splitlines():
            name, _, count = line.partition("\t")
            if name == self.queue and count.strip().isdigit():
                return int(count)
        return -1

    def close(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.stop(60)


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


@contextmanager
def brokers(which: str, amqp_url: str) -> Iterator[tuple[Broker, Callable[[], None]]]:
    """The broker of a scenario and its ``fault`` (drop every connection of the worker to it)."""
    redis, backend = OwnRedis(), OwnRedis()  # the results on a server of their own: only the broker fails
    try:
        if which == "redis":
            yield Broker("redis", redis.url(0), backend.url(1)), lambda: redis.restart(1.0)
            return
        target = urlsplit(amqp_url)
        relay = Relay("127.0.0.1", free_port(), (target.hostname or "127.0.0.1", target.port or 5672))
        auth = target.netloc.rsplit("@", 1)[0] + "@" if "@" in target.netloc else ""
        url = urlunsplit((target.scheme, f"{auth}127.0.0.1:{relay.port}", target.path, "", ""))

        def drop() -> None:
            relay.drop()
            time.sleep(1.0)
            relay.start()

        try:
            yield Broker("rabbitmq", url, backend.url(1)), drop
        finally:
            relay.drop()
    finally:
        redis.close()
        backend.close()


def drop(which: str, amqp_url: str, tmp: Path, quick: bool, rng: random.Random) -> dict[str, Any]:
    """Item 1: the connection lost mid-run (Redis restarted; RabbitMQ's connections dropped)."""
    with brokers(which, amqp_url) as (broker, fault):
        run = Run(broker, tmp, {"TEST_ACKS_LATE": "1", "TEST_BROKER_HEARTBEAT": "10"})
        try:
            w = run.start()
            run.send(200 if quick else 600, pause=0.05)
            faults: list[float] = []
            held: list[int] = []
            for _ in range(1 if quick else 3):
                assert wait_until(lambda: run.pending() < len(run.ids), 60), w.log()[-3000:]
                time.sleep(rng.uniform(0.5, 2.0))
                held.append(run.held(w))
                faults.append(time.time())
                fault()
            figures = run.figures(faults, 120, held)
            run.exits += sum(x.proc is not None and x.proc.poll() is not None for x in run.workers)
            figures["worker_exits"] = run.exits
            return figures
        finally:
            run.close()


def _missing(broker: Broker, queue: str, ids: list[str]) -> int:
    """How many of ``ids`` are in no list, no unacked entry, and have no result (read with the worker frozen)."""
    import redis

    r, backend = redis.Redis.from_url(broker.broker_url), redis.Redis.from_url(broker.backend_url)
    try:
        seen: set[str] = set()
        for suffix in _PRIORITY_SUFFIXES:
            seen.update(str(json.loads(raw).get("headers", {}).get("id")) for raw in r.lrange(queue + suffix, 0, -1))
        seen.update(str(json.loads(raw)[0].get("headers", {}).get("id")) for raw in r.hvals("unacked"))
        rest = [i for i in ids if i not in seen]
        stored = backend.mget([f"celery-task-meta-{i}" for i in rest]) if rest else []
        return sum(v is None for v in stored)
    finally:
        r.close()
        backend.close()


def kills(which: str, amqp_url: str, tmp: Path, quick: bool, rng: random.Random) -> dict[str, Any]:
    """Item 2: the worker's main process SIGKILLed at random moments, a new worker after each."""
    n = 10 if quick else 100
    env = {"TEST_ACKS_LATE": "1", "TEST_PREFETCH_MULTIPLIER": "1", "CELERY_GPU_BULK_RECEIVE": "0",
           "CELERY_GPU_INFLIGHT_LEASE": "2", "TEST_VISIBILITY_TIMEOUT": "3600"}
    with brokers(which, amqp_url) as (broker, _):
        run = Run(broker, tmp, env)
        faults: list[float] = []
        held: list[int] = []
        orphans = in_window = 0
        try:
            w = run.start(devices="fake:1")
            for _ in range(n):
                if run.pending() < 300:
                    run.send(300, pause=0.0)
                assert wait_until(lambda: len(run.starts()) > 0, 30), w.log()[-3000:]
                children = w.child_pids()
                assert w.proc is not None
                for _freeze in range(10):
                    time.sleep(rng.uniform(0.01, 0.15))
                    w.proc.send_signal(signal.SIGSTOP)
                    missing = _missing(broker, run.queue, run.ids) if which == "redis" else 0
                    if missing:
                        in_window += 1
                        break
                    w.proc.send_signal(signal.SIGCONT)
                held.append(run.held(w))  # frozen still: what it holds at the kill
                faults.append(time.time())
                w.proc.send_signal(signal.SIGKILL)
                w.proc.send_signal(signal.SIGCONT)
                w.proc.wait()
                time.sleep(0.5)
                if not wait_until(lambda c=children: not any(alive(p) for p in c), 10):
                    orphans += sum(alive(p) for p in children)
                w.stop()
                w = run.start(devices="fake:1")
            figures = run.figures(faults, 180, held)
            figures.update(orphans=orphans, kills_in_brpop_window=in_window)
            return figures
        finally:
            run.close()


_GARBAGE = [b"\xff\xfe raw bytes", b'{"not": "an envelope"}', b"[1, 2, 3]",
            b'{"body": "W1tdLCB7fSwge31d", "headers": {"id": "x", "task": "tests.apps.chaos.single"}}',
            b"null", b'"a string"']


def garbage(which: str, amqp_url: str, tmp: Path, quick: bool, rng: random.Random) -> dict[str, Any]:
    """Item 3: bytes that are no task message put in the queue around good tasks."""
    from kombu import Connection, Exchange, Producer, Queue

    with brokers(which, amqp_url) as (broker, _):
        run = Run(broker, tmp, {"TEST_ACKS_LATE": "1"})
        try:
            w = run.start()
            rounds = 2 if quick else 5
            started = time.time()
            with Connection(broker.broker_url) as conn:
                channel = conn.channel()
                queue = Queue(run.queue, Exchange(run.queue, "direct"), routing_key=run.queue)
                for _ in range(rounds):
                    run.send(20, pause=0.0)
                    for raw in _GARBAGE:
                        if which == "redis":
                            channel.client.lpush(run.queue, raw)
                        else:
                            Producer(channel).publish(raw, exchange="", routing_key=queue.name,
                                                      content_type="application/json", content_encoding="binary")
                    run.send(20, pause=0.0)
                channel.close()
            figures = run.figures([], 60, [])
            figures["good_done_s"] = round(time.time() - started, 1)
            figures["garbage"] = rounds * len(_GARBAGE)
            run.exits += sum(x.proc is not None and x.proc.poll() is not None for x in run.workers)
            figures["worker_exits"] = run.exits
            figures["worker_log_tail"] = w.log()[-600:] if run.exits else ""
            return figures
        finally:
            run.close()


def link_cut(which: str, amqp_url: str, tmp: Path, quick: bool, rng: random.Random) -> dict[str, Any]:
    """Item 7: two hosts, one cut off mid-run (see tests/chaos/test_two_hosts.py)."""
    why = unavailable()
    if why:
        return {"skipped": why}
    hosts = Hosts(2, amqp_url=amqp_url)
    try:
        sub = tmp / f"cut-{which}"
        sub.mkdir()
        figures = cut_scenario(hosts, which, sub, cut_s=20 if quick else 30, db=0 if which == "redis" else 2)
    finally:
        hosts.close()
    figures["orphans"] = 0
    figures["in_flight_at_faults"] = figures.pop("in_flight_at_cut")
    return figures


SCENARIOS: dict[str, Callable[[str, str, Path, bool, random.Random], dict[str, Any]]] = {
    "drop": drop, "kills": kills, "garbage": garbage, "link_cut": link_cut}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer faults (10 kills, one drop, a 20 s cut)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run, comma-separated")
    parser.add_argument("--brokers", default=",".join(BROKERS))
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    amqp_url = os.environ.get("CELERY_GPU_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
    rng = random.Random(args.seed)
    started = time.monotonic()
    scenarios: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-ledger-") as tmp:
        for name in args.only.split(","):
            for which in args.brokers.split(","):
                t0 = time.monotonic()
                try:
                    figures = SCENARIOS[name](which, amqp_url, Path(tmp), args.quick, rng)
                except Exception as exc:  # a scenario that could not run says why; the others go on
                    figures = {"error": repr(exc)[:2000]}
                figures["duration_s"] = round(time.monotonic() - t0, 1)
                scenarios[f"{name}/{which}"] = figures
                print(f"{name}/{which}: {json.dumps(figures)}", flush=True)
    totals = {k: sum(int(f.get(k, 0)) for f in scenarios.values()) for k in FIGURES}
    summary = {"benchmark": "chaos_ledger", "quick": args.quick, **totals, "scenarios": scenarios,
               "errors": [k for k, f in scenarios.items() if "error" in f],
               "skipped": {k: f["skipped"] for k, f in scenarios.items() if "skipped" in f},
               "duration_s": round(time.monotonic() - started, 1), "command": command_line("chaos_ledger.py", argv),
               "machine": machine(), "source": source_state()}
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
