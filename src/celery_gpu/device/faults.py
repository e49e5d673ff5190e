"""Fault injection for fake devices: OOM above a batch size, sticky errors, hangs, crashes, leaks, bad starts.

So that every recovery of ``recovery.py`` and the pool can be tested on a machine without a GPU. Faults are
chosen per worker with the environment variable ``CELERY_GPU_FAULTS`` (the pool passes its environment to
its device processes), a comma-separated list::

    CELERY_GPU_FAULTS="oom_above=8"                   # a call of more than 8 items raises a CUDA-style OOM
    CELERY_GPU_FAULTS="sticky_after=5,on=1"           # fake:1 only: call 6 raises an illegal-address error,
                                                      # and so does every later call (sticky)
    CELERY_GPU_FAULTS="hang_after=0"                  # the first call hangs, every signal blocked, GIL held
    CELERY_GPU_FAULTS="crash_after=3,crash=segv"      # call 4 kills the process (kill | exit | segv)
    CELERY_GPU_FAULTS="leak=64MiB,peak=1MiB"          # each call leaks 64 MiB of fake device memory;
                                                      # each item peaks at 1 MiB (memory="auto" learns it)
    CELERY_GPU_FAULTS="fail_start,on=1"               # device processes of fake:1 fail to start
    CELERY_GPU_FAULTS="oom_above=8,on=0+2"            # fake:0 and fake:2 only

Calls are counted per device process, from 0, so a replacement process starts clean. Faults fire only in
device processes of *fake* devices (``on=`` narrows them to some fake indices): never on a real GPU. The device
process keeps its :class:`Faults` in its :class:`~celery_gpu.device.context.DeviceContext`; task code that wants
to hang on purpose (tests) calls :func:`hang`.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass, field

from ..errors import FaultSpecError
from ..units import parse_memory

__all__ = ["FAULTS_ENV", "Faults", "FakeCudaError", "OutOfMemoryError", "activate", "hang"]

#: Environment variable holding the fault spec of a worker's fake devices.
FAULTS_ENV = "CELERY_GPU_FAULTS"


class OutOfMemoryError(RuntimeError):
    """A fake device's out-of-memory error, worded as torch's."""


class FakeCudaError(RuntimeError):
    """A fake device's sticky CUDA error, worded as torch's."""


@dataclass
class Faults:
    """Parsed ``CELERY_GPU_FAULTS``: which faults fire, and counters of this process."""

    oom_above: int | None = None
    sticky_after: int | None = None
    hang_after: int | None = None
    crash_after: int | None = None
    crash: str = "kill"
    leak: int = 0
    peak: int = 0
    fail_start: bool = False
    on: set[int] | None = None  # fake device indices; None: every fake device
    calls: int = 0  # calls of task code so far in this process
    leaked: int = 0  # fake device memory this process holds now (what it leaked)
    last_peak: int = 0  # fake peak memory of the last call (``peak`` per item)
    poisoned: bool = field(default=False)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Parse a spec; raises :class:`FaultSpecError` naming the bad part."""
        f = cls()
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, _, value = part.partition("=")
            key = key.strip().lower()
            try:
                if key in ("oom_above", "sticky_after", "hang_after", "crash_after"):
                    setattr(f, key, int(value))
                elif key in ("leak", "peak"):
                    setattr(f, key, parse_memory(value))
                elif key == "crash":
                    if value not in ("kill", "exit", "segv"):
                        raise ValueError(value)
                    f.crash = value
                elif key == "fail_start":
                    f.fail_start = True
                elif key == "on":
                    f.on = {int(i) for i in value.replace("fake:", "").split("+") if i.strip()}
                else:
                    raise ValueError(key)
            except ValueError:
                raise FaultSpecError(f"bad {FAULTS_ENV} part {part!r} (see celery_gpu.faults)") from None
        return f

    def on_call(self, items: int) -> None:
        """Called before each call of task code with its item count; fires what is due."""
        n, self.calls = self.calls, self.calls + 1
        if self.poisoned or (self.sticky_after is not None and n >= self.sticky_after):
            self.poisoned = True
            raise FakeCudaError("CUDA error: an illegal memory access was encountered (fake device)")
        if self.crash_after is not None and n >= self.crash_after:
            _crash(self.crash)
        if self.hang_after is not None and n >= self.hang_after:
            hang()
        if self.oom_above is not None and items > self.oom_above:
            wanted = items * (self.peak or 1024**2)
            raise OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {wanted} bytes (fake device: {items} items > {self.oom_above})")
        self.leaked += self.leak
        self.last_peak = items * self.peak


def activate(device_kind: str, device_index: int, environ: dict[str, str] | None = None) -> Faults | None:
    """The faults for a device process on this device (read once, at start); None when no fault applies here."""
    spec = (os.environ if environ is None else environ).get(FAULTS_ENV, "")
    if device_kind != "fake" or not spec.strip():
        return None
    faults = Faults.parse(spec)
    if faults.on is not None and device_index not in faults.on:
        return None
    return faults


def _crash(how: str) -> None:
    if how == "exit":
        os._exit(1)
    if how == "segv":
        ctypes.string_at(0)  # a real segmentation fault
    os.kill(os.getpid(), signal.SIGKILL)


def hang() -> None:
    """Hang this process for good, as a kernel that never returns (for tests: a task may call it itself)."""
    # As a kernel that never returns, in a process that ignores signals: every catchable signal ignored and
    # blocked, and the GIL held (no other thread of this process runs Python).
    catchable = set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}
    for sig in catchable:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_BLOCK, catchable)
    libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL
    while True:
        libc.sleep(3600)
