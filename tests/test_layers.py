"""The package's shape, kept: the import-linter contracts of pyproject.toml (layers, worker ↛ device, device ↛
worker, no GPU library in the main process, nothing through the root or the paths kept for users), what each
side really loads, and the size limits of classes and functions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(__import__("celery_gpu").__file__).resolve().parent
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60


def test_the_import_contracts_hold() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "broken" not in run.stdout.lower().replace("0 broken", ""), run.stdout


def _loaded(code: str) -> dict[str, list[str]]:
    """The celery_gpu modules and GPU libraries a fresh interpreter holds after ``code``."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps({'ours': sorted(m for m in sys.modules if m.startswith('celery_gpu')),"
             " 'gpu': sorted(m for m in ('torch', 'cupy') if m in sys.modules)}))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    loaded: dict[str, list[str]] = json.loads(run.stdout.strip().splitlines()[-1])
    return loaded


def _of(modules: list[str], package: str) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


def test_importing_the_package_loads_no_worker_or_device_code() -> None:
    loaded = _loaded("import celery_gpu")
    assert _of(loaded["ours"], "celery_gpu.worker") == []
    assert _of(loaded["ours"], "celery_gpu.device") == []
    assert loaded["gpu"] == []


def test_a_producer_loads_no_worker_or_device_code() -> None:
    loaded = _loaded(
        "from celery import Celery\n"
        "from celery_gpu import GPU\n"
        "app = Celery('producer', broker='memory://', backend='cache+memory://')\n"
        "gpu = GPU(app)\n"
        "@gpu.task(batch=8)\n"
        "def embed(texts): return texts\n"
        "@gpu.task(memory='1GiB')\n"
        "def plain(x): return x\n"
        "app.finalize()\n"
        "embed.apply_async(('hello',))\n"
        "embed.submit_many(['a', 'b'])\n"
    )
    assert _of(loaded["ours"], "celery_gpu.worker") == []
    assert _of(loaded["ours"], "celery_gpu.device") == []
    assert loaded["gpu"] == []


@pytest.mark.parametrize("module", ["celery_gpu.worker.pool", "celery_gpu.pool"])
def test_the_pool_loads_no_device_code_and_no_gpu_library(module: str) -> None:
    loaded = _loaded(f"import {module}")
    assert "celery_gpu.worker.pool" in loaded["ours"]
    assert _of(loaded["ours"], "celery_gpu.device") == []
    assert loaded["gpu"] == []


def test_the_device_process_loads_no_worker_code() -> None:
    loaded = _loaded("import celery_gpu.device.main")
    assert _of(loaded["ours"], "celery_gpu.worker") == []


def _sizes() -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                assert node.end_lineno is not None
                found.append((kind, f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}",
                              node.end_lineno - node.lineno + 1))
    return found


def test_no_class_over_400_lines_and_no_function_over_60() -> None:
    sizes = _sizes()
    assert sizes, "no source found"
    too_big = [f"{where} ({lines} lines)" for kind, where, lines in sizes
               if lines > (MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES)]
    assert too_big == []
