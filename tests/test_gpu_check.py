"""scripts/gpu_check.sh --cpu-dry-run: every part of the GPU check that needs no CUDA (the checkpoint, the
init-timing harness, a one-trial Ray sweep read back from MLflow, the summary), on the CPU at small sizes.
The GPU tests step is left out: the suite collects tests/test_gpu.py, which skips itself without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quailora.bench import DEFAULT_METHODS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_of_the_gpu_check(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--skip", "gpu_tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    log = (out / "gpu_check.log").read_text()
    summary = json.loads((out / "gpu_check.json").read_text())
    assert run.returncode == 0 and summary["passed"], run.stdout[-2000:] + log[-6000:]
    steps = summary["steps"]
    assert summary["mode"] == "cpu-dry-run" and list(steps) == [
        "environment",
        "checkpoint",
        "init_timing",
        "sweep",
    ]
    assert steps["environment"]["result"]["cuda_available"] is False
    timing = steps["init_timing"]["result"]
    assert (
        set(timing["per_layer"]) == {f"{method} r8" for method in DEFAULT_METHODS} and not timing["not_timed"]
    )
    assert len(timing["rows"]) == 3 * len(DEFAULT_METHODS)  # the layer's three distinct shapes
    sweep = steps["sweep"]["result"]  # check_sweep_outcome passed: finished, artifacts, bf16, ppl went down
    assert sweep["status"] == "FINISHED" and sweep["tags"]["quailora.eval_path"] == "cpu-bfloat16"
    assert sweep["measured_over_estimate"] > 0 and "| gpu-check " in log  # plan's table, printed by run
