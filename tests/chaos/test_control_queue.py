"""The worker survives its remote-control queue being locked when it (re)connects to RabbitMQ (issue 17, item 6).

Celery declares each worker's remote-control queue (``<nodename>.celery.pidbox``) *exclusive*
(``control_queue_exclusive``, True by default since Celery 5.5): owned by one connection, deleted when that
connection closes. When RabbitMQ drops the worker's connections (``close_all_connections``, a broker restart, a
network cut), the old connection's queue is deleted a moment later, asynchronously; a reconnect that declares
the queue again before that gets ``405 RESOURCE_LOCKED``, and Celery's consumer, which retries only connection
errors, stopped the whole worker for it ("Unrecoverable error", 1 reconnect in 5 in the independent harness).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Broker
from tests.chaos.conftest import start, task
from tests.worker import wait_until

pytestmark = pytest.mark.broker


def _pings(w: Any) -> bool:
    return bool(w.app.control.ping([w.name], timeout=1))


def test_a_locked_control_queue_at_connect_is_waited_for(rabbit_broker: Broker, tmp_path: Path) -> None:
    """Deterministic: another connection holds the worker's exclusive control queue while the worker connects
    and lets it go 1 s later (as a dropped connection's queue goes a moment after the drop)."""
    from kombu import Connection

    from tests.worker import Worker

    w = Worker(rabbit_broker, tmp_path, devices="fake:1", app_module="tests.apps.chaos")
    queue = w.app.control.mailbox.get_queue(w.name)
    with Connection(rabbit_broker.broker_url) as holder:
        queue.bind(holder.default_channel).declare()  # exclusive: ours until this connection closes
        w.start()
        try:
            assert wait_until(lambda: "Connected to" in w.log() or w.proc.poll() is not None, 60), w.log()
            time.sleep(1.0)
        finally:
            holder.release()
    try:
        assert wait_until(lambda: _pings(w), 30), w.log()[-3000:]
        assert w.proc is not None and w.proc.poll() is None
        assert "Unrecoverable error" not in w.log()
    finally:
        assert w.stop() == 0, w.log()[-3000:]


def _worker_connections(pid: int) -> list[str]:
    """RabbitMQ's ids of the connections whose client side is a socket of process ``pid``."""
    ports = set()
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "name"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    ids = []
    for line in out.splitlines():
        conn_pid, _, name = line.partition("\t")
        local = name.split(" -> ")[0]
        if local.rsplit(":", 1)[-1].isdigit() and int(local.rsplit(":", 1)[1]) in ports:
            ids.append(conn_pid)
    return ids


def test_the_worker_survives_repeated_connection_drops(rabbit_broker: Broker, tmp_path: Path) -> None:
    """Two drops of every connection of the worker (RabbitMQ closes them, as ``close_all_connections`` does,
    but only the worker's: the broker may be shared): after each the worker reconnects, answers remote control
    and runs tasks. (Whether a reconnect races the old queue's deletion is up to timing; the test above makes
    that race certain.)"""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH")
    w = start(rabbit_broker, tmp_path, devices="fake:1")
    try:
        single = task(w, "single")
        assert w.proc is not None
        for drop in range(2):
            ids = _worker_connections(w.proc.pid)
            assert ids, "the worker's connections were not found"
            for conn in ids:
                subprocess.run(["rabbitmqctl", "-q", "close_connection", conn, f"chaos drop {drop}"],
                               capture_output=True, timeout=60)
            assert wait_until(lambda: w.proc is not None and (w.proc.poll() is not None or _pings(w)), 60)
            assert w.proc.poll() is None, f"the worker stopped after drop {drop}:\n{w.log()[-4000:]}"
            assert single.delay(drop).get(timeout=60)["item"] == drop
        assert "Unrecoverable error" not in w.log()
    finally:
        w.stop()
