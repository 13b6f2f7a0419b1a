"""MLflow bookkeeping of a sweep: the parent run and its children (trials/tracking.py keeps one child per trial).

The client API (not `mlflow.start_run`) is used so Tune's driver never holds a global active run.
"""

from __future__ import annotations

import json

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from trials.tracking import PARENT_TAG, ensure_experiment

TRIAL_ID_TAG = "tune_trial_id"
STOPPED_EARLY_TAG = "quailora.stopped_early"


def ensure_parent_run(
    client: MlflowClient, experiment_name: str, tracking_uri: str, sweep: dict, parent_run_id: str | None
) -> str:
    """Reopen the recorded parent run (resume) or create it, with the sweep config attached."""
    if parent_run_id:
        client.update_run(parent_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return parent_run_id
    experiment_id = ensure_experiment(client, experiment_name, tracking_uri)
    run = client.create_run(experiment_id, run_name=experiment_name, tags={"quailora.role": "sweep"})
    client.log_text(run.info.run_id, json.dumps(sweep, indent=2), "sweep.json")
    return run.info.run_id


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """Every trial run of the sweep, deleted runs excluded."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000
    )


def end_stopped_runs(client: MlflowClient, parent_run_id: str, trial_ids: set[str]) -> int:
    """KILLED, tagged stopped early: the runs of trials the scheduler (ASHA) stopped.

    Tune stops such a trial by killing its driver mid-training, so nothing in the trial ends its run;
    `trial_ids` are Tune trials that ended without error, so any of their runs still RUNNING was stopped.
    Returns how many runs were ended.
    """
    stopped = [
        run
        for run in child_runs(client, parent_run_id)
        if run.info.status == "RUNNING" and run.data.tags.get(TRIAL_ID_TAG) in trial_ids
    ]
    for run in stopped:
        client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(stopped)


def finish_parent(client: MlflowClient, parent_run_id: str, *, failed: bool) -> None:
    client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")
