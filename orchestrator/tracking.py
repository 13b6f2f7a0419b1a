"""MLflow bookkeeping of a sweep: the parent run and its children (trials/tracking.py keeps one child per trial).

The client API (not `mlflow.start_run`) is used so Tune's driver never holds a global active run.
"""

from __future__ import annotations

import json

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from trials.contract import STOPPED_AT_STEP, STOPPED_EARLY_TAG, TRIAL_ID_TAG
from trials.tracking import PARENT_TAG, ensure_experiment


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


def mark_stopped_early(client: MlflowClient, parent_run_id: str, trial_id: str, step: int | None) -> bool:
    """End the run of a trial the sweep's scheduler (ASHA) stopped: KILLED, tagged stopped early, with the step
    of the result it was stopped on (its metrics so far stay). False if the trial has no run yet."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if not runs:
        return False
    run_id = runs[0].info.run_id
    client.set_tag(run_id, STOPPED_EARLY_TAG, "true")
    if step is not None:
        client.log_metric(run_id, STOPPED_AT_STEP, step, step=int(step))
    client.set_terminated(run_id, status="KILLED")
    return True


def finish_parent(client: MlflowClient, parent_run_id: str, *, failed: bool) -> None:
    client.set_terminated(parent_run_id, status="FAILED" if failed else "FINISHED")


def mark_interrupted(client: MlflowClient, parent_run_id: str) -> int:
    """An interrupted sweep (Ctrl-C) and the trial runs it left RUNNING end KILLED: `quailora status` then
    shows them interrupted rather than running, and `resume` sets each RUNNING again as its trial restarts
    (trials.tracking.open_trial_run). Returns how many trial runs it ended."""
    running = [r for r in child_runs(client, parent_run_id) if r.info.status == "RUNNING"]
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="KILLED")
    return len(running)


STAGE_JOBS_ARTIFACT = "stage_jobs.json"  # on the parent run: orchestrator/stage_service.py's records
STAGE_JOBS, STAGE_JOB_SECONDS = "stage_jobs", "stage_job_seconds"


def log_stage_jobs(client: MlflowClient, parent_run_id: str, records: dict) -> None:
    """Each stage job the sweep ran ahead of its trials, on the parent run: per job its attempts, workers,
    seconds and per init key each stage's status, cache key, seconds and bytes written."""
    client.log_text(parent_run_id, json.dumps(records, indent=1, sort_keys=True), STAGE_JOBS_ARTIFACT)
    client.log_metric(parent_run_id, STAGE_JOBS, len(records))
    client.log_metric(parent_run_id, STAGE_JOB_SECONDS, sum(r["seconds"] for r in records.values()))
