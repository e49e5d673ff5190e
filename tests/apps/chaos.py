"""Tasks for the chaos suite (tests/chaos): every execution is written to a ledger before any work is done.

The ledger (``TEST_LEDGER``, a file) gets one JSON line per execution of task code: the task ids it runs,
the process, and the call's number in that process. Results carry the pid that computed them, so a test can
tell which process each success came from.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from celery import Celery

from celery_gpu import GPU, faults
from tests.brokers import redis_url

app = Celery("chaos")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    task_acks_late=os.environ.get("TEST_ACKS_LATE", "1") == "1",
    broker_connection_retry_on_startup=True,
    broker_heartbeat=float(os.environ.get("TEST_BROKER_HEARTBEAT", "120")),
    worker_prefetch_multiplier=int(os.environ.get("TEST_PREFETCH_MULTIPLIER", "4")),  # 0: no prefetch limit
    # Redis: unacknowledged messages of a dead worker come back after the visibility timeout, looked for every
    # unacked_restore_interval x unacked_restore_throttle seconds (100 s by default; 1 s here).
    broker_transport_options={"visibility_timeout": float(os.environ.get("TEST_VISIBILITY_TIMEOUT", "3600")),
                              "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
                              # a worker killed while it holds the restore lock would stall restores for 300 s
                              "unacked_mutex_expire": 5},
    result_expires=3600,
)
if os.environ.get("TEST_SOCKET_TIMEOUT"):  # a host that may be cut off: blocking reads give up, and reconnect
    _timeout = float(os.environ["TEST_SOCKET_TIMEOUT"])
    app.conf.broker_transport_options.update(socket_timeout=_timeout, socket_connect_timeout=_timeout)
    app.conf.update(redis_socket_timeout=_timeout, redis_socket_connect_timeout=_timeout,
                    broker_connection_timeout=_timeout, result_backend_always_retry=True)
gpu = GPU(app)
_calls = [0]


def _ledger(ids: list[str], **extra: Any) -> int:
    n, _calls[0] = _calls[0], _calls[0] + 1
    path = os.environ.get("TEST_LEDGER")
    if path:
        line = json.dumps({"ids": ids, "pid": os.getpid(), "call": n, "t": time.time(), **extra})
        with open(path, "a") as f:  # one short O_APPEND write per line: lines never interleave
            f.write(line + "\n")
    return n


@gpu.task(batch=int(os.environ.get("TEST_BATCH", "16")), bind=True)
def work(self: Any, items: list[Any], pause: float = 0.0) -> list[dict[str, Any]]:
    """Each item back with the pid and call number; the item ``"poison"`` kills its process."""
    call = _ledger([r["id"] for r in self.request.batch])
    if "poison" in items:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(pause)
    return [{"item": x, "pid": os.getpid(), "call": call} for x in items]


@gpu.task(bind=True)
def single(self: Any, x: Any, pause: float = 0.0) -> dict[str, Any]:
    """One item back with the pid and call number."""
    call = _ledger([self.request.id])
    time.sleep(pause)
    return {"item": x, "pid": os.getpid(), "call": call}


@gpu.task(bind=True)
def hang_once(self: Any, marker: str) -> dict[str, Any]:
    """The first run (no ``marker`` file yet) hangs for good, signals ignored and the GIL held; later runs return."""
    call = _ledger([self.request.id])
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        faults.hang()
    return {"pid": os.getpid(), "call": call}


@gpu.task(bind=True, memory="auto")
def auto(self: Any, x: Any, pause: float = 0.0) -> dict[str, Any]:
    """As ``single``, with ``memory="auto"``."""
    call = _ledger([self.request.id], start=time.time())
    time.sleep(pause)
    return {"item": x, "pid": os.getpid(), "call": call, "end": time.time()}


@gpu.task(batch=16, bind=True)
def gpu_alloc(self: Any, items: list[int], gib: float = 1.0) -> list[dict[str, Any]]:
    """Real GPU only: each item holds ``gib`` GiB of device memory during the call (a batch too big OOMs)."""
    import torch

    call = _ledger([r["id"] for r in self.request.batch])
    held = torch.empty(int(len(items) * gib * 2**30), dtype=torch.uint8, device=gpu.device.torch)
    held.fill_(1)
    torch.cuda.synchronize()
    del held
    return [{"item": x, "pid": os.getpid(), "call": call, "n": len(items)} for x in items]


@gpu.task(bind=True)
def gpu_assert_once(self: Any, marker: str) -> dict[str, Any]:
    """Real GPU only: the first run triggers a device-side assert (an out-of-range index), poisoning its process."""
    import torch

    call = _ledger([self.request.id])
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        x = torch.zeros(4, device=gpu.device.torch)
        x[torch.tensor([10], device=gpu.device.torch)] = 1.0
        torch.cuda.synchronize()
    return {"pid": os.getpid(), "call": call}


@app.task(bind=True)
def plain(self: Any, x: Any) -> dict[str, Any]:
    """A plain Celery task of the app (not a GPU task): it runs in a device process too."""
    call = _ledger([self.request.id])
    return {"item": x, "pid": os.getpid(), "call": call}
