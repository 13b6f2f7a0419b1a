"""``run_trial``: one trial as a Ray Train TorchTrainer, tracked by one MLflow run. The orchestrator's entry point."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from trials.checkpoint_policy import CHECKPOINTS_KEPT, checkpoint_policy
from trials.config import TrialConfig
from trials.contract import FAILURE_TAG, STOPPED_EARLY_TAG, is_result_metric
from trials.entry import stage_loop, train_loop
from trials.process_group import NodeAddressTorchConfig
from trials.tracking import ensure_experiment, mark_failed, open_trial_run, trial_key, trial_tags
from trials.train_runs import train_run
from trials.validation import validate_trial


class TrialStoppedError(RuntimeError):
    """The trial stopped itself (e.g. a non-finite loss); the reason is on its MLflow run."""


class TrialAbortedError(RuntimeError):
    """This process aborted the trial's Train run (Tune stopped the trial); its MLflow run ended KILLED."""


def _result_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if is_result_metric(k) and v is not None}


# The project's packages, shipped to every worker of a cluster job (runtime_env py_modules): a worker node
# needs only the dependencies installed (docs/cluster.md), and runs exactly the driver's code.
PROJECT_PACKAGES = ("quailora", "trials", "orchestrator", "reference")
PY_MODULE_EXCLUDES = ["__pycache__", "*.pyc"]


def job_runtime_env(*, ship_code: bool, env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env of every task and actor of this job (see trials/ray_address.py for the hook)."""
    env: dict = {"worker_process_setup_hook": "trials.ray_address.export_own_address"}
    if env_vars:
        env["env_vars"] = env_vars
    if ship_code:
        root = Path(__file__).resolve().parents[1]
        env["py_modules"] = [str(root / name) for name in PROJECT_PACKAGES]
        env["excludes"] = PY_MODULE_EXCLUDES
    return env


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    log_to_driver: bool = True,
    env_vars: dict[str, str] | None = None,
) -> bool:
    """Join the cluster at ``address``, or start a private local instance (a bare ray.init() would join a
    cluster that RAY_ADDRESS names or that another process on this machine started). Returns False when Ray
    was already initialized here (then the caller did not connect it and must not shut it down).
    On a cluster the job ships this checkout's packages to every worker; ``env_vars`` are set in every task
    and actor of the job. A local instance starts its dashboard: Ray Train's placement-group cleaner needs it."""
    if ray.is_initialized():
        return False
    if address:
        runtime_env = job_runtime_env(ship_code=True, env_vars=env_vars)
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=True,
            log_to_driver=log_to_driver,
            runtime_env=job_runtime_env(ship_code=False, env_vars=env_vars),
        )
    return True


def private_cache_path(storage_path: str, run_name: str) -> Path:
    """Where a trial that shares no cache keeps its stages (reused only by its own restarts): beside its
    checkpoints when storage is a local/shared path, else in a node-local temp dir."""
    if "://" in storage_path:
        return Path(tempfile.gettempdir()) / "quailora_stages" / run_name
    return Path(storage_path) / run_name / "stages"


# Ray Train's own setting: how long one attempt to start the worker group waits for its placement group.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
USER_START_TIMEOUT = os.environ.get(START_TIMEOUT_ENV)  # a user's setting wins


def failure_config(config: TrialConfig, start_timeout_s: float | None = None) -> FailureConfig:
    """Worker failures retried ``train.max_failures`` times; a worker group that cannot start (its resources
    held, or gone with a node) retried until ``start_timeout_s`` (default ``resources.start_timeout_s``), not
    forever (Ray's default). Sets the per-attempt start timeout in this process, which Ray Train passes on
    to the run's controller."""
    total = start_timeout_s or config.resources.start_timeout_s
    per_attempt = float(USER_START_TIMEOUT or min(60.0, total))
    os.environ[START_TIMEOUT_ENV] = str(per_attempt)
    return FailureConfig(
        max_failures=config.train.max_failures,
        controller_failure_limit=max(0, math.ceil(total / per_attempt) - 1),
    )


# How long a stage job's worker group waits for free slots before its service asks again with half the
# workers (orchestrator/stage_service.py); slots a trial holds free only when it ends.
STAGE_JOB_START_TIMEOUT_S = 300.0


def scaling_config(config: TrialConfig) -> ScalingConfig:
    resources = {"CPU": config.resources.cpus_per_worker}
    if config.resources.use_gpu:
        resources["GPU"] = config.resources.gpus_per_worker or 1
    return ScalingConfig(
        num_workers=config.resources.num_workers,
        use_gpu=config.resources.use_gpu,
        resources_per_worker=resources,
    )


def run_trial(
    config: TrialConfig,
    *,
    tracking_uri: str,
    experiment_name: str,
    storage_path: str,
    parent_run_id: str | None = None,
    callbacks: Sequence = (),
    cache_path: str | None = None,
    precomputed: Sequence[str] = (),
    waited_seconds: float = 0.0,
) -> dict[str, float]:
    """Validate, then fine-tune and evaluate one trial; returns its final metrics.

    A retry or a second call with the same config reuses the trial's MLflow run and resumes from its last
    Ray Train checkpoint; a trial whose run already finished returns the recorded metrics. ``cache_path``:
    the stage cache this trial shares with others (trials/cache.py); None keeps its stages private.
    ``precomputed``: the cache digests the sweep's stage job computed for it, ``waited_seconds`` how long it
    waited for that job (orchestrator/stage_service.py).
    """
    plan = validate_trial(config)  # every input error surfaces here, before Ray or any weights
    client = MlflowClient(tracking_uri)
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = ensure_experiment(client, experiment_name, tracking_uri)
    run = open_trial_run(
        client, experiment_id, config, trial_tags(config, plan.model_type, plan.num_parameters), parent_run_id
    )
    run_id = run.info.run_id
    if run.info.status == "FINISHED" or STOPPED_EARLY_TAG in run.data.tags:
        return _result_metrics(run.data.metrics)

    storage_path = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    run_name = f"{config.name}_{trial_key(config)}"
    ensure_ray()
    # Ray Train sends workers' print() to its logger, which then also gets what dill prints into a
    # captured stream while datasets hashes each map function: ~1000 lines of bytecode a worker log.
    # Ray copies this variable from here to the Train controller and its workers; a user's setting wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    def killed() -> None:  # the run's end when this process aborts it, unless the run already ended
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")

    with train_run(on_abort=killed) as handle:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "checkpoint": str(plan.checkpoint),
                "target_names": plan.target_names,
                "tracking_uri": tracking_uri,
                "run_id": run_id,
                "cache_path": str(cache_path or private_cache_path(storage_path, run_name)),
                "precomputed": list(precomputed),
                "waited_seconds": waited_seconds,
                "checkpoint_policy": checkpoint_policy(config.train, plan.num_parameters).to_json(),
            },
            scaling_config=scaling_config(config),
            torch_config=NodeAddressTorchConfig(),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage_path,
                callbacks=[handle.callback, *callbacks],  # the handoff first: before Tune sees any report
                failure_config=failure_config(config),
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as err:
            if handle.aborted:
                raise TrialAbortedError(f"trial {config.name!r}: Train run aborted") from err
            mark_failed(client, run_id, f"{type(err).__name__}: {err}")
            raise
    tags = client.get_run(run_id).data.tags
    if tags.get(FAILURE_TAG):  # set by rank 0 when the trial stops itself
        raise TrialStoppedError(f"trial {config.name!r} stopped: {tags[FAILURE_TAG]}")
    if STOPPED_EARLY_TAG not in tags:  # the scheduler's stop came as the trial finished: it stays stopped
        client.set_terminated(run_id, status="FINISHED")
    return _result_metrics(result.metrics)


def run_stage_job(
    name: str, trials: list[TrialConfig], *, storage_path: str, cache_path: str, num_workers: int
) -> list[dict]:
    """Compute the stages of ``trials`` (one per init key, sharing one quantized base and calibration) into
    the cache at ``cache_path``, as one Ray Train run of ``num_workers`` workers of the trials' kind
    (trials/stage_job.py). Returns per trial its stages' status, digest, seconds and bytes written."""
    items = []
    for config in trials:
        plan = validate_trial(config)
        items.append({"config": config.model_dump(mode="json"), "checkpoint": str(plan.checkpoint),
                      "target_names": plan.target_names})  # fmt: skip
    config = trials[0].model_copy(deep=True)
    config.resources.num_workers = num_workers
    trainer = TorchTrainer(
        stage_loop,
        train_loop_config={"trials": items, "cache_path": cache_path, "name": name},
        scaling_config=scaling_config(config),
        torch_config=NodeAddressTorchConfig(),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=failure_config(
                config, min(STAGE_JOB_START_TIMEOUT_S, config.resources.start_timeout_s)
            ),
        ),
    )
    return json.loads(trainer.fit().metrics["records"])
