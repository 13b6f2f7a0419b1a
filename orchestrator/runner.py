"""`run` and `resume`: every check first, then Ray, the MLflow parent run, the Tuner, and the report."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from orchestrator.cluster_preflight import (
    SharedPath,
    check_cluster_paths,
    environment,
    shared_paths,
    shared_reference_cache,
)
from orchestrator.expand import TrialMatrix, expand
from orchestrator.experiment import STATE_FILE, ExperimentState
from orchestrator.plan import describe, plan_trials, refuse_misfits
from orchestrator.preflight import check_ray_address, check_tracking_uri
from orchestrator.sweep_config import SweepConfig
from quailora.errors import QuailoraInputError
from trials.validation import validate_trial


def prepare(sweep: SweepConfig, address: str | None) -> tuple[TrialMatrix, list[SharedPath]]:
    """All input checks that need no cluster; raises QuailoraInputError before any cluster or run exists.
    Returns the matrix and the directories every node must see (checked once connected, `check_cluster_paths`)."""
    matrix = expand(sweep)
    check_ray_address(address)
    check_tracking_uri(sweep.resolved_tracking_uri())
    planned = plan_trials(matrix)
    print(describe(matrix, planned), flush=True)
    refuse_misfits(matrix, planned)
    checkpoints = {}
    for point in matrix.points:  # model, targets, data sources, tasks; builds a missing reference model
        config = point.trial_config()
        try:
            checkpoints[config.model.path] = validate_trial(config).checkpoint
        except QuailoraInputError as exc:
            raise QuailoraInputError(f"trial {point.name!r}: {exc}") from None
    return matrix, shared_paths(sweep.resolved_storage_path(), sweep.resolved_cache_path(), checkpoints)


def _saved_trials(path: str) -> list:
    """The trials in Tune's saved state. Not the ResultGrid's: after Ctrl-C Tune stops the running trials and
    marks them terminated in memory, while the state it saved before keeps them to restart on resume."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(path).trials


def _ended_trials(path: str) -> int:
    """Trials Tune's saved state has ended (terminated, ASHA's stopped ones included, or failed)."""
    from ray.tune.experiment import Trial

    return sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in _saved_trials(path))


def _ended_points(matrix: TrialMatrix, path: str) -> set[str]:
    """Grid points whose every trial (sample) Tune has terminated: a resume runs none of them again (it
    reruns failed ones, and creates the samples it had not yet created)."""
    from ray.tune.experiment import Trial

    terminated: dict[int, int] = defaultdict(int)
    for trial in _saved_trials(path):
        if trial.status == Trial.TERMINATED:
            terminated[trial.config["point"]] += 1
    samples = matrix.sweep.search.num_samples
    return {matrix.points[i].name for i, n in terminated.items() if n >= samples}


INTERRUPTED = 130  # the exit status of a sweep stopped by Ctrl-C (128 + SIGINT), as shells report it


def _execute(
    matrix: TrialMatrix,
    paths: list[SharedPath],
    state: ExperimentState,
    address: str | None,
    *,
    resume: bool,
    env: dict[str, str],
) -> int:
    """On a cluster, check that every node sees `paths`; then run the Tuner under the parent MLflow run.
    Returns the exit status: 0, 1 if a trial failed, or INTERRUPTED when Tune returned before every trial
    ended (Ctrl-C: Tune saves its state and returns)."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.report import publish_report
    from orchestrator.stage_graph import plan_stage_graph
    from orchestrator.tracking import ensure_parent_run, finish_parent, log_stage_jobs, mark_interrupted
    from orchestrator.tuning import build_tuner, restore_tuner, start_stage_jobs
    from trials.run import ensure_ray

    # log_to_driver False: the caller's Ray (a test's), left running. env: every trial process's too.
    connected = ensure_ray(address, log_to_driver=False, env_vars=env)
    try:
        if address:  # before the parent run and the state file: a refusal leaves nothing behind
            check_cluster_paths(paths, state.tracking_uri)
        client = MlflowClient(state.tracking_uri)
        state.parent_run_id = ensure_parent_run(
            client, state.name, state.tracking_uri, state.sweep, state.parent_run_id
        )
        state.save()
        sweep = matrix.sweep
        graph = plan_stage_graph(matrix) if sweep.resolved_cache_path() and sweep.stage_jobs else None
        if graph and resume:
            needed = graph.without(_ended_points(matrix, state.path))
            if skipped := len(graph.jobs) - len(needed.jobs):
                print(f"stage jobs skipped: {skipped}, their grid points' trials have all ended", flush=True)
            graph = needed
        try:
            stage_jobs = graph.job_of if graph else {}
            tuner = (
                restore_tuner(matrix, state, stage_jobs) if resume else build_tuner(matrix, state, stage_jobs)
            )
            service = start_stage_jobs(matrix, state, graph) if graph else None
            grid = tuner.fit()
            if service is not None:
                log_stage_jobs(client, state.parent_run_id, ray.get(service.records.remote()))
        except KeyboardInterrupt:  # a second Ctrl-C while Tune was saving
            mark_interrupted(client, state.parent_run_id)
            raise
        except BaseException:
            finish_parent(client, state.parent_run_id, failed=True)
            raise
    finally:
        if connected:
            ray.shutdown()
    print(publish_report(client, state), flush=True)
    ended = _ended_trials(state.path)
    if ended < matrix.num_trials:
        mark_interrupted(client, state.parent_run_id)
        print(f"interrupted with {ended} of {matrix.num_trials} trials ended; `quailora resume {state.name}` "
              "continues it", file=sys.stderr)  # fmt: skip
        return INTERRUPTED
    finish_parent(client, state.parent_run_id, failed=grid.num_errors > 0)
    if grid.num_errors:
        print(
            f"{grid.num_errors} trial(s) failed; `quailora resume {state.name}` retries them", file=sys.stderr
        )
        return 1
    return 0


def _prepare_and_execute(
    sweep: SweepConfig, state: ExperimentState, address: str | None, *, resume: bool
) -> int:
    """Checks, then the sweep; on a cluster with the reference cache in the shared storage throughout."""
    env = shared_reference_cache(sweep.resolved_storage_path()) if address else {}
    with environment(env):
        matrix, paths = prepare(sweep, address)
        return _execute(matrix, paths, state, address, resume=resume, env=env)


def run(sweep: SweepConfig, address: str | None) -> int:
    state = ExperimentState.for_sweep(sweep)
    if "://" not in state.path and (Path(state.path) / STATE_FILE).exists():
        raise QuailoraInputError(
            f"name={sweep.name!r}: experiment {state.path} already exists; `quailora resume {sweep.name}` continues it"
        )
    return _prepare_and_execute(sweep, state, address, resume=False)


def resume(experiment: str, storage_path: str | None, address: str | None) -> int:
    from ray.tune import Tuner

    state = ExperimentState.load(experiment, storage_path)
    if not Tuner.can_restore(state.path):
        raise QuailoraInputError(
            f"experiment {state.path}: no Tune state to resume (the sweep stopped before its Tuner started); "
            f"remove the directory and `quailora run` the sweep again"
        )
    return _prepare_and_execute(state.sweep_config(), state, address, resume=True)
