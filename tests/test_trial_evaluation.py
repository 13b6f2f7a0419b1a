"""lm-eval task names: the project's offline reference tasks resolve, unknown ones are named before compute.

(Accuracy on the in-memory model inside a ZeRO-3 trial is asserted in test_trial_qalora.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quailora.errors import QuailoraInputError
from trials.evaluation import lm_eval_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_reference_tasks_resolve_offline_and_unknown_ones_are_named():
    """Reference tasks resolve from local YAML without indexing lm-eval's stock tasks; stock ones resolve."""
    tasks, manager = lm_eval_tasks(["reference:cloze"])
    assert tasks == ["quailora_cloze"] and "quailora_cloze" in manager.all_tasks
    # reference tasks alone skip indexing lm-eval's own (~12 s a trial)
    assert "piqa" not in manager.all_tasks
    with pytest.raises(QuailoraInputError, match="'reference:bogus' is unknown"):
        lm_eval_tasks(["reference:bogus"])
    with pytest.raises(QuailoraInputError, match=r"unknown task\(s\) \['no_such_task'\]"):
        lm_eval_tasks(["no_such_task"])
    assert lm_eval_tasks(["piqa"])[0] == ["piqa"]  # a stock task is still found


def test_trials_without_lm_eval_tasks_never_import_lm_eval(tmp_path):
    """GPU images may lack lm-eval (the project's GPU kit does not carry it): with lm-eval made unimportable,
    the trial and sweep modules import and a trial without tasks validates."""
    script = f"""
import sys
sys.modules["lm_eval"] = None  # any `import lm_eval` now raises ImportError
import orchestrator.cli, orchestrator.runner, orchestrator.tuning, trials.run, trials.worker
from testkit.micro import make_texts, make_trial_checkpoint, micro_trial_config
from trials.validation import validate_trial
root = __import__("pathlib").Path({str(tmp_path)!r})
validate_trial(micro_trial_config(make_trial_checkpoint(root / "ckpt"), make_texts(root)))
try:
    validate_trial(micro_trial_config(root / "ckpt", make_texts(root), eval={{"lm_eval_tasks": ["piqa"]}}))
except ImportError:
    print("tasks need lm_eval")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("tasks need lm_eval")  # the block works: tasks do import it
