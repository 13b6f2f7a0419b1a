#!/usr/bin/env bash
# Drift canary: install the newest versions pyproject.toml allows into a temporary environment (not the lock),
# print how they differ from requirements/lock.txt, and run a quick subset: the CLI's refusals, a micro trial
# (logged adapter reloaded by stock peft) and the export check. Not part of .ci/run: run it before
# scripts/lock.sh refreshes the lock, and when a fresh install may have drifted (docs/environment.md).
# 3 min 17 s in all on 2 cores (2026-12-07, pip cache warm: 57 tests in 96 s). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d "${TMPDIR:-/tmp}/quailora-canary.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "${QUAILORA_TORCH:-torch==2.13.0}"
"$WORK/venv/bin/pip" install -q -e ".[dev]"
normalize() { sed "s/ .*//" | tr "A-Z_" "a-z-" | grep -v "^pip==\|^setuptools==" | sort; }
grep -E '^[A-Za-z0-9_.-]+==' requirements/lock.txt | normalize > "$WORK/locked"
"$WORK/venv/bin/pip" freeze --exclude-editable | normalize > "$WORK/newest"
echo "newest allowed (>) against the lock (<):"
diff "$WORK/locked" "$WORK/newest" | grep '^[<>]' || echo "  no difference"
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$WORK/venv/bin/pytest" -q -p no:cacheprovider \
  tests/test_orchestrator_cli.py tests/test_trial_e2e.py tests/test_export.py "$@"
