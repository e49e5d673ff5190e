"""The peers' own virtualenvs for ``peers.py``: celery-batches needs Celery < 5.7 and Ray Serve brings its own
world, so each runs from a virtualenv built here with pip on first use and reused while complete."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from benchmarks.harness import REPO, child_env

INSTALL_TIMEOUT = 1800.0  # seconds for one virtualenv's pip install
DEFAULT_VENV_DIR = Path.home() / ".cache" / "celery-gpu-bench" / "venvs"


@dataclass(frozen=True)
class PeerEnv:
    """A virtualenv of one peer: what to install in it, and what must import there afterwards."""

    name: str
    requirements: tuple[str, ...]
    check: str  # modules imported to accept the virtualenv
    versions: tuple[str, ...]  # distributions whose versions are recorded

    def directory(self, base: Path) -> Path:
        """``base/<name>-<hash of the Python version and the requirements>``: rebuilt when either changes."""
        key = json.dumps([sys.version, sys.platform, list(self.requirements)]).encode()
        return base / f"{self.name}-{hashlib.sha256(key).hexdigest()[:12]}"


def torch_requirement() -> str:
    """Exactly the torch of this environment (e.g. ``torch==2.13.0+cpu``): never a different (CUDA) build."""
    return f"torch=={metadata.version('torch')}"


def peer_envs() -> dict[str, PeerEnv]:
    torch_req = torch_requirement()
    return {
        "celery_batches": PeerEnv("celery-batches", ("celery[redis]>=5.5,<5.7", "celery-batches==0.11", torch_req),
                                  "celery, celery_batches, redis, torch",
                                  ("celery", "celery-batches", "kombu", "redis", "torch")),
        "ray_serve": PeerEnv("ray-serve", ("ray[serve]==2.60.0", torch_req), "ray, ray.serve, torch",
                             ("ray", "torch", "numpy")),
    }


@dataclass
class ReadyEnv:
    """A usable virtualenv: its interpreter and the versions installed in it."""

    python: str
    versions: dict[str, str | None]


def ensure_venv(env: PeerEnv, base: Path, log_dir: Path) -> ReadyEnv:
    """The virtualenv of ``env`` under ``base``, created and installed unless a complete one is there already.

    Raises ``RuntimeError`` with the reason when it cannot be built (pip's last lines)."""
    target = env.directory(base)
    python = target / "bin" / "python"
    marker = target / ".peers-ready"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)  # a half-built one from an interrupted run
        target.parent.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"install-{env.name}.log"
        print(f"  creating {target} ({', '.join(env.requirements)}); pip's output: {log}", flush=True)
        steps = [[sys.executable, "-m", "venv", str(target)],
                 [str(python), "-m", "pip", "install", "--disable-pip-version-check", *env.requirements]]
        with open(log, "wb") as out:
            for cmd in steps:
                try:
                    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          timeout=INSTALL_TIMEOUT, check=False)
                except subprocess.TimeoutExpired:
                    shutil.rmtree(target, ignore_errors=True)
                    raise RuntimeError(f"{shlex.join(cmd)} took over {INSTALL_TIMEOUT:.0f}s") from None
                if done.returncode:
                    shutil.rmtree(target, ignore_errors=True)
                    tail = log.read_text(errors="replace").strip().splitlines()[-6:]
                    raise RuntimeError(f"{shlex.join(cmd[:4])} ... failed ({done.returncode}): " + " | ".join(tail))
    probe = ("import importlib.metadata as m, json\n"
             f"import {env.check}\n"
             "def v(d):\n"
             "    try:\n        return m.version(d)\n"
             "    except m.PackageNotFoundError:\n        return None\n"
             f"print(json.dumps({{d: v(d) for d in {list(env.versions)!r}}}))\n")
    checked = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False, timeout=300)
    if checked.returncode:
        marker.unlink(missing_ok=True)
        raise RuntimeError(f"{target} does not import {env.check}: {checked.stderr.strip()[-500:]}")
    marker.write_text(json.dumps(list(env.requirements)) + "\n")
    return ReadyEnv(str(python), json.loads(checked.stdout))


def prepare_envs(paths: list[str], base: Path, log_dir: Path) -> tuple[dict[str, ReadyEnv], dict[str, str]]:
    """Every needed peer virtualenv, built in parallel; ``(ready, {path: why skipped})``."""
    wanted = {p: e for p, e in peer_envs().items() if p in paths}
    ready: dict[str, ReadyEnv] = {}
    skipped: dict[str, str] = {}

    def build(path: str, env: PeerEnv) -> None:
        try:
            ready[path] = ensure_venv(env, base, log_dir)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            skipped[path] = f"virtualenv {env.name} could not be built: {exc}"

    threads = [threading.Thread(target=build, args=item, daemon=True) for item in wanted.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path, env in ready.items():
        print(f"  {path}: {env.python} ({', '.join(f'{d} {v}' for d, v in env.versions.items())})", flush=True)
    for path, reason in skipped.items():
        print(f"  {path}: SKIPPED: {reason}", flush=True)
    return ready, skipped


def peer_env(broker: str, **extra: str) -> dict[str, str]:
    """Environment of a process in a peer's virtualenv: the repo alone on ``PYTHONPATH`` (none of celery-gpu's
    environment leaks in), the broker URL."""
    env = child_env(broker, **extra)
    env["PYTHONPATH"] = str(REPO)
    env.pop("VIRTUAL_ENV", None)
    return env
