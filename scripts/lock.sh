#!/usr/bin/env bash
# Refresh requirements/lock.txt to the newest versions pyproject.toml allows, install it into .venv and run the
# whole suite: upgrading the environment is this one deliberate, tested step. Run scripts/canary.sh first to
# see what the newest versions break (docs/environment.md). ~3 min to resolve, then the suite (~20 min).
#   --keep   re-resolve keeping the locked versions where pyproject still allows them (after adding a dependency)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
UPGRADE=--upgrade
if [ "${1:-}" = "--keep" ]; then UPGRADE=; shift; fi
TOOL=${LOCK_TOOL_VENV:-${TMPDIR:-/tmp}/quailora-lock-tool}  # pip-tools lives outside .venv: it is not in the lock
if [ ! -x "$TOOL/bin/pip-compile" ]; then
  python3 -m venv "$TOOL"
  "$TOOL/bin/pip" install -q "pip-tools>=7.7"
fi
# pip-tools resolves with pip itself, so pip's own settings (find-links, constraints) apply exactly as in setup.
"$TOOL/bin/pip-compile" -q $UPGRADE --extra dev --generate-hashes --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links -c requirements/torch-cpu.txt -o requirements/lock.txt pyproject.toml
git --no-pager diff --stat -- requirements/lock.txt || true
bash scripts/test.sh "$@"
