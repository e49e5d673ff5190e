"""Resident memory of a worker's process tree for ``peers.py``: RSS and PSS per process, from ``/proc``, with a
breakdown per kind of process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _status_kb(pid: int, path: str, key: str) -> int:
    """A ``key:  N kB`` line of ``/proc/<pid>/<path>`` (0 if the process or the line is gone)."""
    return kb_line(Path(f"/proc/{pid}/{path}"), key)


def kb_line(file: Path, key: str) -> int:
    """The number of a ``key:  N kB`` line of ``file`` (0 if the file or the line is missing)."""
    try:
        for line in file.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_label(pid: int) -> str:
    """A short name of a process for the memory breakdown: its title (Ray's ``ray::ServeReplica...``), or the
    module it runs (``celery``, ``celery_gpu.device``), or its executable."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return "?"
    if len(args) == 1:  # a process that set its own title
        return args[0].split()[0][:48]
    if "-m" in args[:3]:
        return args[args.index("-m") + 1]
    if "-c" in args[:3]:
        code = args[args.index("-c") + 1] if args.index("-c") + 1 < len(args) else ""
        return "spawned child (python -c)" if "spawn_main" in code else "python -c"
    first = Path(args[0]).name
    if first.startswith("python") and len(args) > 1:
        return Path(args[1].split()[0]).name if args[1] not in ("-u", "-E") else Path(args[2]).name
    return first


@dataclass
class Memory:
    """Resident memory of a set of processes, after warm-up."""

    rss_mb: float
    pss_mb: float
    processes: int
    breakdown_mb: dict[str, float]  # RSS per kind of process (see process_label)

    @classmethod
    def of(cls, pids: set[int], root: int | None = None) -> Memory:
        """Of ``pids``; a process labelled as ``root`` but another is called a child (forked pool children)."""
        rss: dict[int, int] = {pid: _status_kb(pid, "status", "VmRSS") for pid in pids}
        pss = sum(_status_kb(pid, "smaps_rollup", "Pss") for pid in pids)
        root_label = process_label(root) if root is not None else None
        breakdown: dict[str, float] = {}
        for pid, kb in rss.items():
            label = process_label(pid)
            if pid == root:
                label += " (main)"
            elif label == root_label:
                label += " (child)"
            breakdown[label] = breakdown.get(label, 0.0) + kb / 1024
        return cls(round(sum(rss.values()) / 1024, 1), round(pss / 1024, 1), len([k for k in rss.values() if k]),
                   {k: round(v, 1) for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])})
