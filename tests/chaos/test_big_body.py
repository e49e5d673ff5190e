"""One huge body pushed raw (no claim-check) must not leave the worker's main process large for good (issue 17,
item 6): the shared-memory segment that carried it gives its pages back once the device process has read it,
and the device process drops its landing buffer after the task."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.brokers import Broker
from tests.chaos.conftest import APP, start
from tests.worker import wait_until

pytestmark = pytest.mark.broker

MiB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_huge_raw_body_leaves_no_lasting_memory(redis_broker: Broker, tmp_path: Path) -> None:
    w = start(redis_broker, tmp_path, devices="fake:1")
    try:
        single = w.app.signature(f"{APP}.single")
        assert single.delay(1).get(timeout=30)["item"] == 1  # warm: every code path loaded
        assert w.proc is not None
        main, device = w.proc.pid, w.child_pids()[0]
        before_main, before_device = rss(main), rss(device)
        # 48 MiB of arguments (3 x RETAIN), pushed as a plain JSON body: through the pool's shared memory whole.
        task_id = str(uuid.uuid4())
        body = json.dumps([["x" * (48 * MiB)], {}, {}]).encode()
        with w.app.producer_or_acquire() as producer:
            producer.publish(body, routing_key=w.queue, exchange="", content_type="application/json",
                             content_encoding="utf-8", serializer=None, retry=True,
                             headers={"lang": "py", "task": f"{APP}.single", "id": task_id, "root_id": task_id,
                                      "retries": 0, "argsrepr": "(...)", "kwargsrepr": "{}", "ignore_result": False})
        del body
        assert w.app.AsyncResult(task_id).get(timeout=120)["item"] == "x" * (48 * MiB)
        # The result is stored from the device process; the main process frees the message with its request.
        limit = 40 * MiB  # what may stay: the segment's retained 16 MiB, allocator slack
        assert wait_until(lambda: rss(main) - before_main < limit, 15), \
            f"main process grew by {(rss(main) - before_main) / MiB:.0f} MiB and stays so"
        assert wait_until(lambda: rss(device) - before_device < limit, 15), \
            f"device process grew by {(rss(device) - before_device) / MiB:.0f} MiB and stays so"
        assert w.child_pids() == [device]
    finally:
        assert w.stop() == 0, w.log()[-3000:]
