"""Host -> device copies: celery-gpu's pinned staging (``celery_gpu.staging.to_device``) against a plain
``torch.from_numpy(a).to(device)``, at 1, 64 and 256 MiB of float32.

    python benchmarks/gpu/bandwidth.py [--device cuda|cpu] [--out bandwidth.json]

After a second of warm-up (copies and matrix products: an idle GPU's clock is low), per size: each way timed
``--repeat`` times in three alternating rounds, each after two warm-up copies (each copy synchronized), the median GB/s
of each, their ratio, and whether both gave the same tensor. The staging buffer is pinned once and reused, as in
a device process. With ``--device cpu`` (the dry run of ``benchmarks/gpu/run.sh --cpu``) there is no
host-to-device copy: both ways return CPU tensors and the figures only show that the script runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SIZES_MIB = (1, 64, 256)


def timed(copy: Any, sync: Any, repeat: int) -> tuple[list[float], Any]:
    for _ in range(2):
        copy()
    sync()
    times = []
    out = None
    for _ in range(repeat):
        started = time.perf_counter()
        out = copy()
        sync()
        times.append(time.perf_counter() - started)
    return times, out


def measure(device: str, mib: int, repeat: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from celery_gpu.staging import to_device

    a = np.random.default_rng(mib).random(mib * 2**20 // 4, dtype=np.float32)

    def sync() -> None:
        return torch.cuda.synchronize() if device == "cuda" else None

    target = "cuda:0" if device == "cuda" else "cpu"
    staged_s: list[float] = []
    plain_s: list[float] = []
    staged = plain = None
    for _ in range(3):  # alternate the two ways, so that neither alone meets a clock still ramping up
        times, staged = timed(lambda: to_device(a, target), sync, max(1, repeat // 3))
        staged_s += times
        times, plain = timed(lambda: torch.from_numpy(a).to(target), sync, max(1, repeat // 3))
        plain_s += times
    gb = a.nbytes / 1e9
    staged_gbps, plain_gbps = gb / statistics.median(staged_s), gb / statistics.median(plain_s)
    return {"mib": mib, "staged_gb_per_s": round(staged_gbps, 2), "plain_gb_per_s": round(plain_gbps, 2),
            "staged_over_plain": round(staged_gbps / plain_gbps, 3), "equal": bool(torch.equal(staged, plain)),
            "staged_ms": round(1000 * statistics.median(staged_s), 3),
            "plain_ms": round(1000 * statistics.median(plain_s), 3)}


def warm_up(device: str, seconds: float = 1.0) -> None:
    """Copies and matrix products for ``seconds`` first: an idle GPU sits at a low clock (345 MHz on the H200,
    1980 MHz busy), and the first size measured would otherwise pay for its ramp."""
    if device != "cuda":
        return
    import torch

    x = torch.ones(64 * 2**20 // 4)
    m = torch.ones(2048, 2048, device="cuda")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        x.to("cuda")
        m @ m
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu for a dry run")
    warm_up(args.device)
    rows = [measure(args.device, mib, args.repeat) for mib in SIZES_MIB]
    summary = {"benchmark": "bandwidth", "device": args.device, "dry_run": args.device != "cuda",
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "sizes": rows}
    for r in rows:
        print(f"{r['mib']:>4} MiB: staged {r['staged_gb_per_s']} GB/s, plain .to() {r['plain_gb_per_s']} GB/s "
              f"(x{r['staged_over_plain']}), equal: {r['equal']}")
    line = json.dumps(summary)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
