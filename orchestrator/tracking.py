"""MLflow bookkeeping of a sweep: the parent run and its children (trials/tracking.py keeps one child per trial).

The client API (not `mlflow.start_run`) is used so Tune's driver never holds a global active run.
"""

from __future__ import annotations

import json

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from trials.tracking import ensure_experiment

TRIAL_ID_TAG = "tune_trial_id"
PARENT_TAG = "mlflow.parentRunId"


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


def finish_parent(client: MlflowClient, parent_run_id: str, *, failed: bool) -> None:
    client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")
