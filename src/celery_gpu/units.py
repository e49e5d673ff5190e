"""Byte sizes: the one table of units celery-gpu reads (settings, ``memory=``, fault specs, ``fake:NxMEM``, the
sizes in CUDA's out-of-memory messages) and the one way it prints them."""

from __future__ import annotations

import re

__all__ = ["GiB", "UNITS", "human_bytes", "parse_memory"]

GiB = 1024**3

#: Unit (lower case) -> bytes: powers of 1000 for ``K``/``KB``..., powers of 1024 for ``KiB``...
UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_HUMAN = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_memory(value: int | str) -> int:
    """Turn ``2GiB``, ``512MB``, ``1.5G`` or a plain byte count into bytes.

    Raises:
        ValueError: the value is negative or not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size must be >= 0, got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"not a memory size: {value!r} (use e.g. 2GiB, 512MB or a byte count)")
    size = float(match.group(1)) * UNITS[unit]
    if size >= 2**63:
        raise ValueError(f"memory size too large: {value!r}")
    return int(size)


def human_bytes(n: int | None) -> str:
    """``3.00 MiB``, ``512 B``; ``?`` for an unknown size."""
    if n is None:
        return "?"
    size = float(n)
    for unit in _HUMAN:
        if size < 1024 or unit == _HUMAN[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
