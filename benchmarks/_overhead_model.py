"""The workload shared by every path of ``benchmarks/overhead.py``: a small MLP and one 1x512 input per item.

torch is imported inside the functions only, so that the benchmark driver (which never runs the model) stays
light and starts fast.
"""

from __future__ import annotations

import random
from typing import Any

#: Layer widths of the MLP: 512 -> 2048 -> 2048 -> 512 (about 6.3 M float32 parameters).
WIDTHS = (512, 2048, 2048, 512)
#: Seed of the weights: every process builds the very same model.
MODEL_SEED = 1234
#: Seed of the inputs.
INPUT_SEED = 42


def make_inputs(count: int, seed: int = INPUT_SEED) -> list[list[float]]:
    """``count`` deterministic inputs, each a list of ``WIDTHS[0]`` floats in [-1, 1] (sent as JSON)."""
    rng = random.Random(seed)
    return [[rng.uniform(-1.0, 1.0) for _ in range(WIDTHS[0])] for _ in range(count)]


def build_model() -> Any:
    """Build the MLP in float32 on the CPU with fixed weights, and pin torch to one thread in this process."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(MODEL_SEED)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS, WIDTHS[1:], strict=False)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(WIDTHS) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def infer(model: Any, x: list[float]) -> float:
    """Run one 1x512 input through ``model``; the sum of the output, as a Python float."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([x], dtype=torch.float32))
    return float(out.sum())


def naive_item(x: list[float]) -> float:
    """The naive approach, from a fresh interpreter: import torch, build the model, run one input."""
    return infer(build_model(), x)


def process_item(x: list[float], conn: Any) -> None:
    """Target of a spawned ``multiprocessing.Process``: :func:`naive_item`, result sent back on ``conn``."""
    conn.send(naive_item(x))
    conn.close()


#: What ``python -c`` runs in the subprocess path: one input as JSON on stdin, the result on stdout.
SUBPROCESS_CODE = (
    "import json, sys\n"
    "from benchmarks._overhead_model import naive_item\n"
    "print(json.dumps(naive_item(json.load(sys.stdin))))\n"
)
