#!/usr/bin/env bash
# One command that proves a CUDA install of quailora, offline, in under 8 minutes on one H100/H200
# (scripts/gpu_check.py says what it checks):
#   bash scripts/gpu_check.sh [--out DIR] [--work DIR] [--cpu-dry-run]
# DIR/gpu_check.json is the summary (rewritten after every step), DIR/gpu_check.log every step's output.
# Exit 0 when every step passed. Python: $PYTHON, else .venv/bin/python if there is one, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# On the bare GPU machine: wheels the GPU kit does not carry (scripts/gpu_stage_extras.sh stages them).
if [ -d .gpu/extras ] && ! "$PY" -c "import datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target /tmp/quailora_extras .gpu/extras/*.whl
  export PYTHONPATH=/tmp/quailora_extras${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
