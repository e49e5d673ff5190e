"""What every benchmark script does around its measurements: the broker, the command line it records, the
machine and the code it ran on, the final JSON line, and turning a failure or SIGTERM into an exit status."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent.parent

T = TypeVar("T")


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.username:
        host = f"{parts.username}@{host}"
    return urlunsplit(parts._replace(netloc=host))


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, for the JSON: ``python benchmarks/<script> ARGS`` with any URL's password
    hidden (``argv`` as given to ``main``, else this process's arguments)."""
    shown = [redact(a) if "://" in a else a for a in (sys.argv[1:] if argv is None else argv)]
    return shlex.join(["python", f"benchmarks/{script}", *shown])


def open_broker(stack: contextlib.ExitStack, url: str | None) -> tuple[str, str]:
    """``(url, how it is shown)`` of the benchmark's broker: ``url`` (password hidden), else an embedded Redis
    that lives as long as ``stack``."""
    if url:
        return url, redact(url)
    from celery_gpu.embedded import EmbeddedRedis

    return stack.enter_context(EmbeddedRedis()).url, "embedded-redis"


def emit(summary: dict[str, Any], out: Path | None) -> None:
    """Print the benchmark's final JSON line (the last line of its output), and write it to ``out`` too."""
    line = json.dumps(summary)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    print(line)


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine and the main versions, for the JSON."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "celery": version("celery")}


def source_state() -> dict[str, Any]:
    """Which celery-gpu code ran: the git commit, the files of ``src/celery_gpu`` that differ from it, and a
    digest of that directory's content (equal digests, same code, whatever the commit)."""
    src = REPO / "src" / "celery_gpu"
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    state: dict[str, Any] = {"src_digest": digest.hexdigest()[:16]}
    try:
        state["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], check=True,
                                         capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src/celery_gpu"],
                                check=True, capture_output=True, text=True).stdout
        state["src_changes"] = [line.strip() for line in status.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        pass  # not a git checkout: the digest alone says which code ran
    return state


def source_after(before: dict[str, Any]) -> dict[str, Any]:
    """The JSON's ``source``: ``before`` (``source_state()`` at the start) and whether the code changed since;
    warns on stderr when it did."""
    after = source_state()
    source = {**before, "changed_during_run": after["src_digest"] != before["src_digest"]}
    if source["changed_during_run"]:
        print("warning: src/celery_gpu changed while this ran: the figures mix two versions", file=sys.stderr)
    return source


def exit_code(exc: BaseException) -> int:
    """Report ``exc`` and turn it into an exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(exc, SystemExit):
        print(f"stopped ({exc.code})", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 1
    traceback.print_exception(exc)
    return 1


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwinds the context managers, so workers and the embedded Redis are stopped."""
    raise SystemExit(128 + signum)


def run_guarded(run: Callable[[], T]) -> tuple[int, T | None]:
    """``(0, run())``, or ``(exit status, None)`` once a failure (or an interrupt) is reported.

    Call it inside the broker's ``with``: when it returns, the failure's frames, and the pending results they
    hold, are gone while Redis still runs. Freed after it stops, each result would make Celery's client retry
    its lost connection for many seconds."""
    try:
        return 0, run()
    except BaseException as exc:
        return exit_code(exc), None
