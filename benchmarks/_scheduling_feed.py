"""The low-priority load of ``benchmarks/scheduling.py``, in a process of its own (so that publishing it does not
slow down the client whose round trips are measured): ``python -m benchmarks._scheduling_feed FIRST``.

Keeps ``work`` items flowing at ``FEED_PER_S`` per second with priority 9 (the least urgent on Redis) and
``ignore_result`` (nobody waits on them) until it is terminated. The broker comes from ``OVERHEAD_BROKER``.
"""

from __future__ import annotations

import sys
import time

from benchmarks._scheduling_app import work

FEED_PER_S = 1200
CHUNK = 300
LOW = 9


def main(first: int) -> None:
    n = first
    started = time.monotonic()
    while True:
        work.submit_many(range(n, n + CHUNK), priority=LOW, ignore_result=True)
        n += CHUNK
        ahead = (n - first) / FEED_PER_S - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


if __name__ == "__main__":
    main(int(sys.argv[1]))
