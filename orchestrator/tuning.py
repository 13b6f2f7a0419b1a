"""Ray Tune side of a sweep: the search space, the trial driver that launches each trial's TorchTrainer, and the Tuner.

Ray 2.60 runs Ray Train V2: the Tune trial is a light function ("driver") that starts a TorchTrainer
whose workers reserve their own resources, so the driver asks only for `driver_cpus` and the
concurrency limit keeps the cluster from being oversubscribed by waiting trainers. When Tune stops a
trial (ASHA prunes it, or the sweep ends), the driver aborts its Train run before its actor exits
(`trials/train_runs.py` says why Ray would not release the run's placement group otherwise).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

import ray
from ray import tune
from ray.tune.result import DONE
from ray.tune.search import BasicVariantGenerator
from ray.tune.trainable import wrap_function

from orchestrator.expand import TrialMatrix, TrialPoint, sampled_trial_name
from orchestrator.experiment import ExperimentState
from orchestrator.sweep_config import (
    ChoiceDomain,
    LogUniformDomain,
    RandIntDomain,
    SweepConfig,
    UniformDomain,
)
from quailora.errors import QuailoraInputError
from trials.contract import SEED_TAG, STEP, TRIAL_ID_TAG, VAL_PPL_FINAL

# Tune domain per sampled sweep domain; categorical choices travel as indices (Optuna needs plain values).
TUNE_DOMAINS: dict[type, Callable[[Any], Any]] = {
    ChoiceDomain: lambda d: tune.choice(list(range(len(d.choice)))),
    UniformDomain: lambda d: tune.uniform(*d.uniform),
    LogUniformDomain: lambda d: tune.loguniform(*d.loguniform),
    RandIntDomain: lambda d: tune.randint(*d.randint),
}


def _key(path: str) -> str:
    return path.replace(".", "__")


def param_space(matrix: TrialMatrix) -> dict[str, Any]:
    indices = list(range(len(matrix.points)))
    point = tune.choice(indices) if matrix.sweep.search.algorithm == "optuna" else tune.grid_search(indices)
    sampled = {_key(path): TUNE_DOMAINS[type(domain)](domain) for path, domain in matrix.sampled.items()}
    return {"point": point, "sampled": sampled}


def decode_sampled(matrix_sampled: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for path, domain in matrix_sampled.items():
        value = config["sampled"][_key(path)]
        values[path] = domain.choice[value] if isinstance(domain, ChoiceDomain) else value
    return values


def trial_driver(
    config: dict[str, Any], *, points: list[TrialPoint], sampled: dict[str, Any], state: dict[str, Any]
) -> None:
    """One Tune trial: run (or, after a retry, continue) the trial and report its final metrics to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from trials.run import TrialAbortedError, run_trial

    trial_id = tune.get_context().get_trial_id()
    values = decode_sampled(sampled, config)
    point = points[config["point"]]
    trial = point.trial_config(values)
    trial.name = sampled_trial_name(point.name, state["name"], values)  # the MLflow run's name
    trial.tags = {**trial.tags, TRIAL_ID_TAG: trial_id, SEED_TAG: str(trial.seed)}

    precomputed, waited = _wait_for_stage_job(state, point.name)
    # A retry or resume reaches the same MLflow run (and Train checkpoint): run_trial keys them by the
    # trial's config, which the stable Tune trial id in its tags makes unique to this trial.
    try:
        metrics = run_trial(
            trial,
            tracking_uri=state["tracking_uri"],
            experiment_name=state["name"],
            storage_path=f"{state['storage_path'].rstrip('/')}/{state['name']}/train",
            parent_run_id=state["parent_run_id"],
            callbacks=[TuneReportCallback()],
            cache_path=state["cache_path"],
            precomputed=precomputed,
            waited_seconds=waited,
        )
    except TrialAbortedError:
        return  # Tune is stopping this trial (StopTrainRuns.cleanup aborted its Train run); nothing to report
    tune.report(metrics)


def _wait_for_stage_job(state: dict[str, Any], point: str) -> tuple[list[str], float]:
    """The digests the sweep's stage job computed for this trial and the seconds waited for it, holding no
    worker (orchestrator/stage_service.py); nothing to wait for on the on-demand path."""
    from orchestrator.stage_service import actor_name, precomputed_digests

    job_id = state["stage_jobs"].get(point)
    if job_id is None:
        return [], 0.0
    began = time.monotonic()
    record = ray.get(ray.get_actor(actor_name(state["name"])).wait.remote(job_id))
    return precomputed_digests(record), time.monotonic() - began


def _discard_pending_report() -> None:
    """Ray's TuneReportCallback hands each Train report to the trial's actor through a queue of one item, which
    Tune stops reading once it stops the trial; the Train controller would block on its next report there and
    never get to its abort."""
    from ray.train._internal.session import get_session
    from ray.util.queue import Empty

    queue = get_session()._inter_actor_queue  # the queue TuneReportCallback puts into
    if queue is not None:
        with suppress(Empty):
            queue.get_nowait()


class StopTrainRuns:
    """Tune trainable mixin: before Tune ends a trial's actor, abort the Train runs it started, so their
    workers and placement group are released (see trials/train_runs.py)."""

    def cleanup(self) -> None:
        from trials.train_runs import abort_train_runs

        abort_train_runs(while_waiting=_discard_pending_report)
        super().cleanup()


class StoppedEarlyCallback(tune.Callback):
    """Records, when Tune's scheduler (ASHA) stops a trial, its MLflow run as KILLED and stopped early, with the
    step of the result it stopped on; before the trial's actor is stopped, so a sweep interrupted meanwhile
    still knows the trial was stopped (a resume then does not train it again)."""

    def __init__(self, tracking_uri: str, parent_run_id: str) -> None:
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if not result.get(DONE):  # Tune marks the result it stops a trial on done; a finished trial's last
            return  # result reaches callbacks without it
        from mlflow.tracking import MlflowClient

        from orchestrator.tracking import mark_stopped_early

        mark_stopped_early(
            MlflowClient(self.tracking_uri), self.parent_run_id, trial.trial_id, result.get(STEP)
        )


class ProgressCallback(tune.Callback):
    """One line per trial event and a periodic summary, so a long sweep shows where it is. Trials are named
    as their MLflow runs are: grid values and sampled values."""

    def __init__(self, matrix: TrialMatrix, every_s: float = 30.0) -> None:
        self.matrix, self.total, self.every_s, self._last, self._done = (
            matrix,
            matrix.num_trials,
            every_s,
            0.0,
            0,
        )
        self._stopped: set[str] = set()

    def name(self, trial) -> str:
        point = self.matrix.points[trial.config["point"]]
        values = decode_sampled(self.matrix.sampled, trial.config)
        return sampled_trial_name(point.name, self.matrix.sweep.name, values)

    def _say(self, text: str) -> None:
        print(f"[quailora {time.strftime('%H:%M:%S')}] {text}", file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._say(f"started  {trial.trial_id} {self.name(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(DONE):  # the scheduler stops the trial on this result (see StoppedEarlyCallback)
            self._stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._done += 1
        name, last = self.name(trial), trial.last_result or {}
        if trial.trial_id in self._stopped:
            what, shown = "stopped ", f" early at {STEP} {last.get(STEP)}"
        else:
            ppl = last.get(VAL_PPL_FINAL)
            what, shown = "finished", f" {VAL_PPL_FINAL}={ppl:.3f}" if isinstance(ppl, float) else ""
        self._say(f"{what} {trial.trial_id} {name}{shown} ({self._done}/{self.total} this session)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(f"error    {trial.trial_id} {self.name(trial)}: {trial.error_file or 'see logs'}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(f"retrying {trial.trial_id} {self.name(trial)} (failure {trial.run_metadata.num_failures})")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            counts: dict[str, int] = {}
            for t in trials:
                counts[t.status] = counts.get(t.status, 0) + 1
            self._say(", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) + f" of {self.total}")


def trial_demands(matrix: TrialMatrix) -> list[tuple[str, int, dict[str, float]]]:
    """(trial name, workers, Ray resources per worker) at every sampled corner, as the trial's TorchTrainer reserves them."""
    from trials.run import scaling_config

    scalings = [(p.name, scaling_config(t)) for p in matrix.points for t in matrix.corner_trials(p)]
    return [(name, s.num_workers, s.resources_per_worker) for name, s in scalings]


def _driver_bundle(sweep: SweepConfig) -> dict[str, float]:
    """What each trial's driver reserves; zero amounts left out (a driver on a 0-CPU head asks for no CPU)."""
    return {
        key: amount for key, amount in {**sweep.driver_resources, "CPU": sweep.driver_cpus}.items() if amount
    }


def _whole_trial(workers: int, worker: Mapping[str, float], driver: Mapping[str, float]) -> dict[str, float]:
    total = Counter(driver)
    total.update({key: workers * amount for key, amount in worker.items()})
    return dict(total)


def fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(key, 0.0) >= amount for key, amount in bundle.items())


def _show(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if not k.startswith("node:")) + "}"


def alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def check_fits_cluster(matrix: TrialMatrix, nodes: list[Mapping[str, float]]) -> None:
    """Refuse a trial Tune would keep pending forever: its driver or one of its workers fits no node,
    or all of it together needs more than the whole cluster has."""
    driver = _driver_bundle(matrix.sweep)
    cluster: Counter[str] = Counter()
    for node in nodes:
        cluster.update(node)
    shown = ", ".join(_show(n) for n in nodes)
    for name, workers, worker in trial_demands(matrix):
        checks = [
            ("its driver", driver, nodes, "any node has"),
            ("one of its workers", worker, nodes, "any node has"),
            (
                "all its workers and driver",
                _whole_trial(workers, worker, driver),
                [cluster],
                "the cluster has",
            ),
        ]
        for what, bundle, candidates, limit in checks:
            if not any(fits(bundle, node) for node in candidates):
                raise QuailoraInputError(
                    f"trial {name!r}: {what} need(s) {_show(bundle)}, more than {limit} (nodes: {shown})"
                )


def default_concurrency(matrix: TrialMatrix, cluster: Mapping[str, float]) -> int:
    """As many trials as the cluster's CPUs, GPUs and custom resources hold for the largest trial (driver included)."""
    driver = _driver_bundle(matrix.sweep)
    need: dict[str, float] = {}
    for _, workers, worker in trial_demands(matrix):
        for key, amount in _whole_trial(workers, worker, driver).items():
            need[key] = max(need.get(key, 0.0), amount)
    fit = min(math.floor(cluster.get(key, 0.0) / amount) for key, amount in need.items() if amount > 0)
    return max(1, fit)


def _search_alg(sweep: SweepConfig, max_concurrent: int):
    s = sweep.search
    if s.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(
            OptunaSearch(metric=s.metric, mode=s.mode, seed=s.seed), max_concurrent=max_concurrent
        )
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent)


def _scheduler(matrix: TrialMatrix):
    asha = matrix.sweep.search.asha
    if asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    options = dict(
        metric=asha.metric, mode=matrix.sweep.search.mode, time_attr=asha.time_attr, max_t=asha.max_t,
        grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
    )  # fmt: skip
    if asha.compare_across is None:
        return ASHAScheduler(**options)
    from orchestrator.grouped_asha import GroupedASHA, trial_groups

    return GroupedASHA(*trial_groups(matrix, asha.compare_across, _key), **options)


def make_trainable(matrix: TrialMatrix, state: ExperimentState, stage_jobs: Mapping[str, str]):
    """``stage_jobs``: grid point -> the stage job its trials wait for (orchestrator/stage_graph.py)."""
    driver = tune.with_parameters(
        trial_driver,
        points=matrix.points,
        sampled=matrix.sampled,
        state={
            **{k: getattr(state, k) for k in ("name", "storage_path", "tracking_uri", "parent_run_id")},
            "cache_path": matrix.sweep.resolved_cache_path(),
            "stage_jobs": dict(stage_jobs),
        },
    )
    # Tune's function trainable, with a cleanup that aborts the trial's Train run first.
    trainable = type("TrialDriver", (StopTrainRuns, wrap_function(driver)), {})
    return tune.with_resources(trainable, _driver_bundle(matrix.sweep))


def _callbacks(matrix: TrialMatrix, state: ExperimentState) -> list[tune.Callback]:
    # StoppedEarlyCallback first: the progress line of a stopped trial comes after its run is marked.
    return [
        StoppedEarlyCallback(state.tracking_uri, state.parent_run_id),
        ProgressCallback(matrix),
    ]


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_concurrency(matrix: TrialMatrix) -> int:
    return matrix.sweep.search.max_concurrent_trials or default_concurrency(matrix, ray.cluster_resources())


def start_stage_jobs(matrix: TrialMatrix, state: ExperimentState, graph):
    """The sweep's stage service (its jobs running), or None: Tune's trials then wait for them."""
    from orchestrator.stage_service import start

    return start(graph, matrix.sweep, state, trial_concurrency(matrix), _driver_bundle(matrix.sweep))


def build_tuner(matrix: TrialMatrix, state: ExperimentState, stage_jobs: Mapping[str, str]) -> tune.Tuner:
    # Intermediate results come from Train workers (train_loss, val_ppl); the sweep metric arrives at the end.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    sweep = matrix.sweep
    check_fits_cluster(matrix, alive_nodes())
    concurrency = trial_concurrency(matrix)
    return tune.Tuner(
        make_trainable(matrix, state, stage_jobs),
        param_space=param_space(matrix),
        tune_config=tune.TuneConfig(
            search_alg=_search_alg(
                sweep, concurrency
            ),  # the searcher enforces the limit (Tune ignores it otherwise)
            scheduler=_scheduler(matrix),
            num_samples=sweep.search.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=state.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.search.max_failures),
            callbacks=_callbacks(matrix, state),
            verbose=0,
        ),
    )


def restore_tuner(matrix: TrialMatrix, state: ExperimentState, stage_jobs: Mapping[str, str]) -> tune.Tuner:
    """Finished trials stay finished; unfinished and errored ones run again."""
    check_fits_cluster(matrix, alive_nodes())
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = make_trainable(matrix, state, stage_jobs)
    return tune.Tuner.restore(state.path, trainable=trainable, resume_errored=True)
