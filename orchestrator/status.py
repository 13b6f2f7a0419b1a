"""`quailora status`: experiments under a storage path with their trial counts, and the Ray cluster if given."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from orchestrator.experiment import ExperimentState
from trials.contract import STOPPED_EARLY_TAG

STOPPED_EARLY = "STOPPED_EARLY"


def _outcome(run) -> str:
    """The run's MLflow status, except STOPPED_EARLY for a run the scheduler stopped (KILLED and tagged);
    a KILLED run without the tag was interrupted with its sweep."""
    return STOPPED_EARLY if STOPPED_EARLY_TAG in run.data.tags else run.info.status


def _trial_counts(state: ExperimentState) -> dict[str, int]:
    """Outcomes of the sweep's MLflow child runs (the one record that survives a killed driver)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import child_runs

    if not state.parent_run_id:
        return {}
    client = MlflowClient(state.tracking_uri)
    return dict(Counter(_outcome(run) for run in child_runs(client, state.parent_run_id)))


def experiments_table(storage_path: str) -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    rows = []
    for state in ExperimentState.list_under(storage_path):
        parent = (
            MlflowClient(state.tracking_uri).get_run(state.parent_run_id) if state.parent_run_id else None
        )
        counts = _trial_counts(state)
        rows.append(
            {
                "experiment": state.name,
                "sweep": parent.info.status if parent else "NOT STARTED",
                "finished": counts.get("FINISHED", 0),
                "running": counts.get("RUNNING", 0),
                "failed": counts.get("FAILED", 0),
                "stopped early": counts.get(STOPPED_EARLY, 0),  # by the scheduler (ASHA)
                "interrupted": counts.get("KILLED", 0),  # with their sweep; `quailora resume` continues them
                "path": state.path,
            }
        )
    return pd.DataFrame(rows)


def cluster_summary(address: str) -> str:
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        total, free = ray.cluster_resources(), ray.available_resources()
        return (
            f"ray cluster {address}: {len(nodes)} alive node(s); CPU {free.get('CPU', 0):g}/{total.get('CPU', 0):g} free, "
            f"GPU {free.get('GPU', 0):g}/{total.get('GPU', 0):g} free"
        )
    finally:
        ray.shutdown()
