"""`quailora status`: experiments under a storage path with their trial counts, and the Ray cluster if given."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from orchestrator.expand import expand
from orchestrator.experiment import ExperimentState
from trials.contract import STOPPED_EARLY_TAG

STOPPED_EARLY = "STOPPED_EARLY"


def _outcome(run) -> str:
    """The run's MLflow status, except STOPPED_EARLY for a run the scheduler stopped (KILLED and tagged);
    a KILLED run without the tag was interrupted with its sweep."""
    return STOPPED_EARLY if STOPPED_EARLY_TAG in run.data.tags else run.info.status


def _sweep_status(parent) -> str:
    """The parent run's MLflow status; KILLED is a sweep interrupted by Ctrl-C (runner.INTERRUPTED)."""
    if parent is None:
        return "NOT STARTED"
    return "INTERRUPTED" if parent.info.status == "KILLED" else parent.info.status


def _child_runs(state: ExperimentState) -> list:
    """The sweep's MLflow child runs (the one record that survives a killed driver)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import child_runs

    if not state.parent_run_id:
        return []
    return child_runs(MlflowClient(state.tracking_uri), state.parent_run_id)


def seconds_per_trial(intervals: list[tuple[float, float]]) -> float | None:
    """The sweep's pace: the time at least one of these (start, end) trials was running, per trial. Trials
    that overlapped share it, so it counts the concurrency the sweep had, and gaps with nothing running
    (an interrupted sweep before its resume) do not count. None without a trial."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy / len(intervals) if intervals else None


PACE_WINDOW = 20  # the latest trials to end set the pace: the sweep's machine may be busier or freer now


def _time_left(runs: list, remaining: int) -> str:
    """Hours the remaining trials take at the pace of the latest ended ones (finished or stopped early)."""
    if remaining <= 0:
        return "0 h"
    ended = sorted((r for r in runs if r.info.end_time and _outcome(r) in ("FINISHED", STOPPED_EARLY)),
                   key=lambda r: r.info.end_time)  # fmt: skip
    pace = seconds_per_trial([(r.info.start_time / 1e3, r.info.end_time / 1e3) for r in ended[-PACE_WINDOW:]])
    return "n/a" if pace is None else f"{remaining * pace / 3600:.1f} h"


def _num_trials(state: ExperimentState) -> int | None:
    """None for an experiment whose stored config this version no longer reads: listed, not counted."""
    try:
        return expand(state.sweep_config()).num_trials
    except ValueError:  # pydantic's ValidationError and QuailoraInputError both are
        return None


def experiments_table(storage_path: str) -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    rows = []
    for state in ExperimentState.list_under(storage_path):
        parent = (
            MlflowClient(state.tracking_uri).get_run(state.parent_run_id) if state.parent_run_id else None
        )
        runs = _child_runs(state)
        counts = Counter(_outcome(run) for run in runs)
        total = _num_trials(state)
        ended = counts["FINISHED"] + counts[STOPPED_EARLY] + counts["FAILED"]
        rows.append(
            {
                "experiment": state.name,
                "sweep": _sweep_status(parent),
                "trials": total,
                "finished": counts.get("FINISHED", 0),
                "running": counts.get("RUNNING", 0),
                "failed": counts.get("FAILED", 0),
                "stopped early": counts.get(STOPPED_EARLY, 0),  # by the scheduler (ASHA)
                "interrupted": counts.get("KILLED", 0),  # with their sweep; `quailora resume` continues them
                "time left (est.)": "n/a" if total is None else _time_left(runs, total - ended),
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
