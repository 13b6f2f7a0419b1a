#!/usr/bin/env bash
# Create .venv with everything the project needs. Idempotent: a second run only checks.
# CPU machines get the CPU build of torch; set QUAILORA_TORCH to override (e.g. a CUDA build already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "${QUAILORA_TORCH:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[dev]"
