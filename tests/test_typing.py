"""Static checks: the package is mypy-clean (strict), the public API type-checks in user code, ruff is clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = '''
from celery import Celery
from celery_gpu import GPU, Device

app = Celery("proj")
gpu = GPU(app, devices="fake:2", per_device=2)

@gpu.setup
def load(device: Device) -> None:
    device.state["model"] = object()

@gpu.task(memory="2GiB")
def infer(x: list[float]) -> float:
    return sum(x) + gpu.device.total_memory

total: int = gpu.device.total_memory
label: str = gpu.device.label
'''


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_package_and_user_code_are_mypy_clean(tmp_path: Path) -> None:
    user = tmp_path / "user_app.py"
    user.write_text(USER_CODE)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         str(ROOT / "src" / "celery_gpu"), str(user)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
def test_ruff_is_clean() -> None:
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks", "examples"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
