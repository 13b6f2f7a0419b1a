"""lm-eval task names: the project's offline reference tasks resolve, unknown ones are named before compute.

(Accuracy on the in-memory model inside a ZeRO-3 trial is asserted in test_trial_qalora.py.)
"""

from __future__ import annotations

import pytest

from quailora.errors import QuailoraInputError
from trials.evaluation import lm_eval_tasks


def test_reference_tasks_resolve_offline_and_unknown_ones_are_named():
    tasks, manager = lm_eval_tasks(["reference:cloze"])
    assert tasks == ["quailora_cloze"] and "quailora_cloze" in manager.all_tasks
    with pytest.raises(QuailoraInputError, match="'reference:bogus' is unknown"):
        lm_eval_tasks(["reference:bogus"])
    with pytest.raises(QuailoraInputError, match=r"unknown task\(s\) \['no_such_task'\]"):
        lm_eval_tasks(["no_such_task"])
