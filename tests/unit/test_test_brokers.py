"""The suite's broker settings come from the environment (README, "Run the tests"), for shared machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json
from tests.brokers import make
import tests.apps.basic as basic
r, q = make("redis", None, db=5), make("rabbitmq", None, db=5)
print(json.dumps([r.broker_url, r.backend_url, q.broker_url, basic.app.conf.broker_url]))
"""


def _urls(env: dict[str, str]) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_GPU_TEST_", "TEST_"))}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env, "CI": "false"},
                         capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_defaults_are_the_machine_servers() -> None:
    assert _urls({}) == ["redis://127.0.0.1:6379/5", "redis://127.0.0.1:6379/6",
                         "amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/14"]


def test_environment_names_the_servers_databases_and_vhost() -> None:
    # The probe only builds URLs: make() checks that the server listens, so use the machine's ports here.
    urls = _urls({"CELERY_GPU_TEST_REDIS": "redis://localhost:6379", "CELERY_GPU_TEST_REDIS_DB_OFFSET": "16",
                  "CELERY_GPU_TEST_AMQP": "amqp://guest:guest@localhost:5672/celery-gpu-tests"})
    assert urls == ["redis://localhost:6379/21", "redis://localhost:6379/22",
                    "amqp://guest:guest@localhost:5672/celery-gpu-tests", "redis://localhost:6379/30"]
