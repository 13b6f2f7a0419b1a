#!/usr/bin/env bash
# Create .venv with exactly the locked environment (requirements/lock.txt, hash-checked). Idempotent: a second
# run only checks. The lock's torch is the CPU build; a torch already in .venv (a GPU user's CUDA build) is kept,
# and QUAILORA_TORCH="torch==<version>" installs that torch instead. QUAILORA_UNLOCKED=1 installs the newest
# versions pyproject.toml allows instead of the lock (what scripts/canary.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ -n "${QUAILORA_TORCH:-}" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$QUAILORA_TORCH"
fi
if [ -n "${QUAILORA_UNLOCKED:-}" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  exit 0
fi
reqs=requirements/lock.txt
if .venv/bin/python -c "import torch" 2>/dev/null; then  # keep the installed torch: the lock less its torch entry
  reqs=$(mktemp)
  trap 'rm -f "$reqs"' EXIT
  awk '/^torch==/ {skip = 1} skip && !/\\$/ {skip = 0; next} !skip' requirements/lock.txt > "$reqs"
fi
.venv/bin/pip install -q --require-hashes --no-deps -r "$reqs"
.venv/bin/pip install -q --no-deps --no-build-isolation -e .  # the project itself; its build backend is locked
.venv/bin/pip check >/dev/null || { .venv/bin/pip check; exit 1; }
