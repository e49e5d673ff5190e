"""Do device processes ever outlive their worker? Kill-timing trials across a device process's start.

Each trial (``tests/orphans.py``) starts a parent interpreter that spawns one device process exactly as the pool
does (``Slot.spawn``, on a fake device, app ``tests.apps.basic`` whose setup hook logs its start and then sleeps
60 s: a model load that is slow or never ends) and SIGKILLs itself a chosen delay after the spawn returned. The
trial then watches the child for ``--grace`` seconds: an *orphan* is a child still alive then; a *setup after
death* is a setup hook that started after its parent had died.

The delays cover the spawn window: first a few calibration trials (a delay past the setup hook's start) measure
how long a device process takes from ``Popen`` to its setup hook on this machine, now (``window_s``, their
median); then ``--trials`` delays are spread evenly over ``[0, 1.5 × window_s]``, so that most kills land
while the child is still starting and some after its setup hook began. No broker is needed.

Usage::

    python benchmarks/orphans.py [--trials 100] [--grace 1.5] [--out results.json]

The last line printed is one JSON object: ``trials``, ``orphans``, ``setup_after_death``, ``window_s``, the
slowest death after the parent's (``max_outlived_parent_s``), and the delays of any orphan.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` and ``tests.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.harness import command_line, emit, machine  # noqa: E402
from benchmarks.harness.run import source_after, source_state  # noqa: E402
from tests.orphans import trial  # noqa: E402

CALIBRATION = 3


def run(trials: int, grace: float, tmp: Path) -> dict[str, Any]:
    """Calibrate the spawn window, then ``trials`` kills spread over it."""
    starts = [trial(3.0, tmp, grace)["setup_started_s"] for _ in range(CALIBRATION)]
    seen = [s for s in starts if s is not None]
    if not seen:
        raise SystemExit(f"no setup hook started within 3 s in {CALIBRATION} calibration trials")
    window = statistics.median(seen)
    delays = [round(1.5 * window * i / max(1, trials - 1), 4) for i in range(trials)]
    outcomes = []
    for delay in delays:
        outcomes.append(trial(delay, tmp, grace))
        print(outcomes[-1], flush=True)
    orphans = [o for o in outcomes if o["orphan"]]
    late = [o for o in outcomes if o["setup_after_death"]]
    before_setup = [o for o in outcomes if o["setup_started_s"] is None or o["setup_started_s"] > o["delay"]]
    return {
        "trials": trials, "orphans": len(orphans), "setup_after_death": len(late),
        "killed_before_setup": len(before_setup), "window_s": round(window, 3),
        "calibration_setup_started_s": starts,
        "max_outlived_parent_s": max(o["outlived_parent_s"] for o in outcomes),
        "orphan_delays": [o["delay"] for o in orphans],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--grace", type=float, default=1.5, help="seconds a child may live after its parent")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    before = source_state()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="orphans-") as tmp:
        figures = run(args.trials, args.grace, Path(tmp))
    summary = {"benchmark": "orphans", "command": command_line("orphans.py", argv), **figures,
               "duration_s": round(time.monotonic() - started, 1), "machine": machine(),
               "source": source_after(before)}
    emit(summary, args.out)
    return 0 if figures["orphans"] == 0 and figures["setup_after_death"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
