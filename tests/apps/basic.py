"""The integration tests' app: tasks that report where they ran and misbehave on purpose."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_gpu import GPU
from tests.brokers import redis_url

app = Celery("basic")
app.conf.update(
    broker_url=os.environ.get("TEST_BROKER") or redis_url(14),
    result_backend=os.environ.get("TEST_BACKEND") or redis_url(15),
    task_default_queue=os.environ.get("TEST_QUEUE", "celery"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    worker_pool_restarts=True,
)
if os.environ.get("TEST_FS_DIR"):  # kombu's filesystem transport: no event loop, the pool runs its own thread
    _fs = os.environ["TEST_FS_DIR"]
    app.conf.broker_transport_options = {"data_folder_in": _fs, "data_folder_out": _fs, "control_folder": _fs,
                                         "polling_interval": 0.05}
gpu = GPU(app)


@gpu.setup
def load(device: Any) -> None:
    device.state["setup_pid"] = os.getpid()
    log = os.environ.get("TEST_SETUP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {device.label}\n")
    time.sleep(float(os.environ.get("TEST_SETUP_SLEEP", "0")))  # a slow model load (within gpu_setup_timeout)
    if os.environ.get("TEST_SETUP_HANG") == device.label:
        time.sleep(3600)  # a setup hook that never returns
    gate = os.environ.get("TEST_SETUP_GATE")  # a model load that ends when the test says so (the file exists)
    while gate and not os.path.exists(gate):
        time.sleep(0.05)
    if os.environ.get("TEST_SETUP_FAIL") in (device.label, "all"):
        raise RuntimeError(f"setup refused on {device.label}")


@gpu.task
def where(x: int) -> dict[str, Any]:
    d = gpu.device
    return {"x": x, "pid": os.getpid(), "device": d.label, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "setup_pid": d.state.get("setup_pid")}


@gpu.task(memory="1GiB")
def add(x: int, y: int) -> int:
    return x + y


@gpu.task(memory="1GiB")
def hold(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@gpu.task(memory="1TiB")
def too_big() -> None:
    raise AssertionError("never runs: no device is that big")


@gpu.task
def size(blob: str) -> int:
    return len(blob)


@gpu.task
def array_stats(a: Any, extra: Any = None) -> dict[str, Any]:
    """What arrived: a numpy array (through the arrays serializer), described in JSON-friendly terms."""
    import numpy as np

    assert isinstance(a, np.ndarray), type(a)
    return {"shape": list(a.shape), "dtype": a.dtype.str, "sum": float(a.astype("f8").sum()),
            "fortran": bool(a.flags.f_contiguous and not a.flags.c_contiguous),
            "extra": None if extra is None else {k: list(v.shape) for k, v in extra.items()}}


@gpu.task
def echo(blob: str) -> str:
    """Returns its argument (a long one travels both ways through the pool's shared memory)."""
    return blob


@gpu.task
def echo_slowly(blob: str, seconds: float) -> int:
    """Holds a long argument for ``seconds`` (a process to kill in the middle of a task)."""
    time.sleep(seconds)
    return len(blob)


@gpu.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@gpu.task
def sleep_marked(marker: str, seconds: float) -> int:
    """Writes ``marker`` (its pid) when it starts, then sleeps: a task known to be running, on any transport."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


@gpu.task(time_limit=1)
def hang() -> None:
    time.sleep(60)


@gpu.task(soft_time_limit=0.5)
def soft() -> str:
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "not interrupted"


@gpu.task
def boom(msg: str) -> None:
    raise ValueError(msg)


@gpu.task(bind=True, max_retries=3, default_retry_delay=0)
def flaky(self: Any, marker: str, fail_times: int) -> int:
    path = Path(marker)
    attempts = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempts))
    if attempts <= fail_times:
        raise self.retry(countdown=0)
    return attempts


@gpu.task(reject_on_worker_lost=True)
def die_once(marker: str) -> int:
    """SIGKILLs its own process the first time; the pool runs it again in another process."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@gpu.task
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@gpu.task
def torch_here() -> str:
    import torch

    return str(torch.__version__)


@gpu.task
def thread_budget() -> dict[str, Any]:
    """The CPU threads this device process's torch uses, and the thread variables it started with."""
    import torch

    return {"torch": torch.get_num_threads(), "pid": os.getpid(),
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


@app.task
def plain(x: int) -> int:
    return x * 2


@gpu.task
def cuda_info() -> dict[str, Any]:
    """GPU tests: what this device process sees of CUDA."""
    import torch

    x = torch.ones(256, 256, device=gpu.device.torch)
    return {"device_count": torch.cuda.device_count(), "tensor_device": str((x @ x).device),
            "label": gpu.device.label, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "name": torch.cuda.get_device_name(0)}
