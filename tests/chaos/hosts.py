"""Test hosts in network namespaces: each a namespace joined to the root namespace (the brokers' host) by a
veth pair, its link cut and healed with ``ip link set down/up``.

The brokers stay on the root namespace: a redis-server of our own bound to the root ends of the links (and
127.0.0.1), and for RabbitMQ (which listens on 127.0.0.1 only) a ``socat`` forwarder per link. Everything
is named ``cgpu<tag>...`` with a random tag and removed at :meth:`Hosts.close`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.worker import Worker


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "socat", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    name = f"cgpuprobe{os.getpid() % 100000}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    command = ["ip", *(["-n", ns] if ns else []), *args]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {run.stderr.strip()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A redis-server of our own (AOF on) on ``port``, bound to ``binds``; :meth:`restart` keeps its data."""

    def __init__(self, port: int | None = None, binds: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.port = port or free_port()
        self.binds = binds
        self.dir = Path(tempfile.mkdtemp(prefix="cgpu-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int, addr: str = "127.0.0.1") -> str:
        return f"redis://{addr}:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.binds, "--protected-mode", "no",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down: float = 1.0) -> None:
        """Stop the server (its clients' connections drop), wait ``down`` seconds, start it on its data."""
        self.stop()
        time.sleep(down)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Relay:
    """A TCP forwarder (``socat``) from ``listen:port`` to ``target``; :meth:`drop` cuts every connection
    through it (the process group dies), :meth:`start` listens again."""

    def __init__(self, listen: str, port: int, target: tuple[str, int]) -> None:
        self.listen, self.port, self.target = listen, port, target
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.port},bind={self.listen},fork,reuseaddr",
             f"TCP:{self.target[0]}:{self.target[1]}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if subprocess.run(["ss", "-ltnH", f"sport = :{self.port}"], capture_output=True, text=True).stdout.strip():
                return
            time.sleep(0.05)

    def drop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
            self.proc = None


class Hosts:
    """``n`` hosts (namespaces) linked to the root namespace, a Redis for them, RabbitMQ forwarders."""

    def __init__(self, n: int, amqp_url: str | None = None) -> None:
        self.tag = f"{random.randrange(16**4):04x}"
        self.net = random.randrange(1, 250)
        self.names = [f"cgpu{self.tag}{i}" for i in range(n)]
        self.links = [f"cg{self.tag}{i}r" for i in range(n)]
        self._relays: list[Relay] = []
        self.redis: OwnRedis | None = None
        self.amqp_url = amqp_url
        self.amqp_port = free_port() if amqp_url else 0
        try:
            for i in range(n):
                self._link(i)
            self.redis = OwnRedis(binds=("127.0.0.1", *(self.root_addr(i) for i in range(n))))
            self.redis_port = self.redis.port
            if amqp_url:
                target = urlsplit(amqp_url)
                self._relays = [Relay(self.root_addr(i), self.amqp_port,
                                      (target.hostname or "127.0.0.1", target.port or 5672)) for i in range(n)]
        except BaseException:
            self.close()
            raise

    def root_addr(self, i: int) -> str:
        """The broker host's address on host ``i``'s link."""
        return f"10.231.{self.net}.{4 * i + 1}"

    def _link(self, i: int) -> None:
        ns, root, peer = self.names[i], self.links[i], f"cg{self.tag}{i}n"
        _ip("netns", "add", ns)
        _ip("link", "add", root, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("addr", "add", f"{self.root_addr(i)}/30", "dev", root)
        _ip("link", "set", root, "up")
        _ip("addr", "add", f"10.231.{self.net}.{4 * i + 2}/30", "dev", peer, ns=ns)
        _ip("link", "set", peer, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def redis_url(self, db: int, host: int | None = None) -> str:
        """This Redis as seen from host ``host`` (None: from the root namespace)."""
        addr = "127.0.0.1" if host is None else self.root_addr(host)
        return f"redis://{addr}:{self.redis_port}/{db}"

    def amqp(self, host: int | None = None) -> str:
        """RabbitMQ as seen from host ``host`` (None: the real URL)."""
        assert self.amqp_url is not None
        if host is None:
            return self.amqp_url
        parts = urlsplit(self.amqp_url)
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit((parts.scheme, f"{auth}{self.root_addr(host)}:{self.amqp_port}", parts.path, "", ""))

    def cut(self, i: int) -> None:
        _ip("link", "set", self.links[i], "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.links[i], "up")

    def close(self) -> None:
        """Stop what runs in the namespaces, the Redis and forwarders; remove links and namespaces."""
        for ns in self.names:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        for relay in self._relays:
            relay.drop()
        if self.redis is not None:
            self.redis.close()
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class HostWorker(Worker):
    """A :class:`~tests.worker.Worker` whose process runs on host ``ns`` (``ip netns exec``)."""

    def __init__(self, ns: str, *args: Any, **kwargs: Any) -> None:
        self.ns = ns
        super().__init__(*args, **kwargs)

    def client(self) -> Any:
        """A client app on the root namespace's view of the brokers (``CLIENT_BROKER``/``CLIENT_BACKEND``)."""
        from celery import Celery

        app = Celery(f"client-{self.queue}", broker=self.env["CLIENT_BROKER"], backend=self.env["CLIENT_BACKEND"],
                     set_as_current=False)
        app.conf.update(task_default_queue=self.queue, result_expires=3600)
        return app

    def start(self) -> HostWorker:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "celery", "-A", self.app_module, "worker",
             "-l", "info", "-n", self.name, "-Q", self.queue, "--without-mingle", "--without-gossip", *self.args],
            cwd=Path(__file__).resolve().parents[2], env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self


def _runs(workers: list[Worker]) -> dict[str, list[str]]:
    """Task id -> the names of the workers that ran it, from each worker's ledger."""
    import json

    runs: dict[str, list[str]] = {}
    for w in workers:
        path = Path(w.env["TEST_LEDGER"])
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            for task_id in json.loads(line)["ids"]:
                runs.setdefault(task_id, []).append(w.name)
    return runs


def held(w: Worker) -> set[str]:
    """Ids of the tasks ``w`` holds (received, not acked): Celery's active and reserved requests."""
    inspect = w.app.control.inspect([w.name], timeout=1)
    ids: set[str] = set()
    for reply in (inspect.active() or {}, inspect.reserved() or {}):
        ids.update(t["id"] for t in reply.get(w.name, []))
    return ids


def cut_scenario(hosts: Hosts, which: str, tmp: Path, cut_s: float = 30, tasks: int = 300,
                 pause: float = 0.1, db: int = 0) -> dict[str, Any]:
    """Workers on hosts 0 and 1 share a queue; host 0's link is cut for ``cut_s`` seconds mid-run, then
    healed. Returns the figures: ``lost``, ``run_twice``, ``in_flight_at_cut`` (what host 0 held),
    ``redelivered`` (of those, run on host 1), ``done_during_cut`` (every task finished while cut off),
    ``served_after_heal`` (of 40 tasks sent once it answers a ping again, host 1 stopped, those it ran),
    ``worker_exits``."""
    from tests.brokers import Broker
    from tests.worker import wait_until

    workers: list[Worker] = []
    queue = f"q-cut-{os.urandom(4).hex()}"
    for i in range(2):
        url = hosts.redis_url(db, i) if which == "redis" else hosts.amqp(i)
        env = {"TEST_LEDGER": str(tmp / f"ledger-{i}.jsonl"), "TEST_ACKS_LATE": "1",
               "TEST_PREFETCH_MULTIPLIER": "1", "TEST_SOCKET_TIMEOUT": "3", "TEST_BROKER_HEARTBEAT": "4",
               "TEST_VISIBILITY_TIMEOUT": "3600", "CELERY_GPU_INFLIGHT_LEASE": "6",
               "CLIENT_BROKER": hosts.redis_url(db) if which == "redis" else hosts.amqp(),
               "CLIENT_BACKEND": hosts.redis_url(db + 1)}
        broker = Broker(which, url, hosts.redis_url(db + 1, i))
        w = HostWorker(hosts.names[i], broker, tmp, devices="fake:2", app_module="tests.apps.chaos",
                       extra_env=env, queue=queue)
        workers.append(w.start())
    try:
        for w in workers:
            w.wait_ready()
        cut, other = workers
        client = cut.app
        single = client.signature("tests.apps.chaos.single")
        results = [single.clone(args=(i,), kwargs={"pause": pause}).apply_async() for i in range(tasks)]
        assert wait_until(lambda: sum(r.ready() for r in results) >= tasks // 10, 60), cut.log()[-3000:]
        in_flight = held(cut)
        hosts.cut(0)
        t_cut = time.time()
        done_during_cut = wait_until(lambda: all(r.ready() for r in results), cut_s)
        time.sleep(max(0.0, t_cut + cut_s - time.time()))
        hosts.heal(0)
        t_heal = time.time()
        assert wait_until(lambda: all(r.ready() for r in results), 60), "tasks never finished"
        back = wait_until(lambda: bool(client.control.ping([cut.name], timeout=0.5)), 60)
        other.stop()  # what comes next is the cut worker's alone
        more = [single.clone(args=(i,), kwargs={"pause": pause}).apply_async() for i in range(40)]
        assert wait_until(lambda: all(r.ready() for r in more), 60), "tasks after the heal never finished"
        values = [r.get(timeout=5, propagate=False) for r in results + more]
        lost = sum(not (isinstance(v, dict) and "item" in v) for v in values)
        runs = _runs(workers)
        ids = {r.id for r in results}
        served_after = _served_after(cut, t_heal, {r.id for r in more})
        exits = sum(w.proc is not None and w.proc.poll() is not None for w in workers if w is not other)
        return {"lost": lost, "run_twice": sum(len(runs.get(i, [])) > 1 for i in ids),
                "in_flight_at_cut": len(in_flight),
                "redelivered": sum(other.name in runs.get(i, []) for i in in_flight),
                "done_during_cut": bool(done_during_cut), "reconnected": bool(back),
                "served_after_heal": served_after, "worker_exits": exits}
    finally:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.stop()


def _served_after(w: Worker, since: float, ids: set[str]) -> int:
    import json

    path = Path(w.env["TEST_LEDGER"])
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if (e := json.loads(line))["t"] >= since and set(e["ids"]) & ids)
