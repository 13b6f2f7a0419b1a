#!/usr/bin/env bash
# Set up .venv if needed, lint, then run the whole test suite (CPU, < 20 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# DeepSpeed compiles its CPU ops into TORCH_EXTENSIONS_DIR; one per checkout, so a build another checkout
# left half-done (its lock file) cannot block this one.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/pytest -q --durations=25 "$@"  # the slowest tests in every CI log
