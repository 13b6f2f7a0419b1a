"""ASHA within groups of trials: one Ray ASHAScheduler per combination of the swept fields ASHA does not
compare across (`search.asha.compare_across`).

Ray's ASHA compares every trial of a sweep at each rung. In a sweep over models, ranks and init methods as
well as learning rates, that prunes the worse model or method (4-bit QLoRA against 8-bit, say), not the
worse learning rate, and the comparison then lacks its baselines. Grouped, each arm's learning rates
compete only with each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from orchestrator.expand import TrialMatrix


def trial_groups(
    matrix: TrialMatrix, compare_across: list[str], tune_key: Callable[[str], str]
) -> tuple[list[str], list[str]]:
    """Per grid point, its values of the fields ASHA groups by (one JSON string: picklable for Tune's saved
    state), and the Tune config keys (`tune_key`) of the sampled fields ASHA groups by."""
    points = [
        json.dumps({p: v for p, v in point.grid_values.items() if p not in compare_across}, sort_keys=True)
        for point in matrix.points
    ]
    return points, [tune_key(path) for path in matrix.sampled if path not in compare_across]


class GroupedASHA(FIFOScheduler):
    """Dispatches each trial to the ASHA of its group (trial_groups), created at the group's first trial."""

    def __init__(self, points: list[str], sampled: list[str], **asha: Any) -> None:
        super().__init__()
        self._points, self._sampled, self._asha = points, sampled, asha
        self._metric = asha["metric"]
        self._groups: dict[tuple, ASHAScheduler] = {}

    def group(self, trial: Trial) -> tuple:
        """The trial's grid values and sampled values outside compare_across (Tune's config, orchestrator.tuning)."""
        sampled = trial.config.get("sampled", {})
        return self._points[trial.config["point"]], tuple(sampled.get(key) for key in self._sampled)

    def _scheduler(self, trial: Trial) -> ASHAScheduler:
        key = self.group(trial)
        if key not in self._groups:
            self._groups[key] = ASHAScheduler(**self._asha)
        return self._groups[key]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return True  # every group's ASHA has its metric and mode from the sweep

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self._scheduler(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._scheduler(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA in {len(self._groups)} group(s) of trials"
