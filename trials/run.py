"""``run_trial``: one trial as a Ray Train TorchTrainer, tracked by one MLflow run. The orchestrator's entry point."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from trials.cache import STAGES
from trials.config import TrialConfig
from trials.tracking import (
    FAILURE_TAG,
    ensure_experiment,
    mark_failed,
    open_trial_run,
    trial_key,
    trial_tags,
)
from trials.validation import validate_trial
from trials.worker import train_trial

# The metrics a trial returns (the sweep report reads these names), plus any lmeval_<task>_acc.
RESULT_METRICS = (
    "val_ppl_init",
    "val_ppl_final",
    *(f"{stage}_{kind}" for stage in STAGES for kind in ("seconds", "saved_seconds")),
    "train_seconds",
    "tokens_per_second",
    "init_peak_memory_mb",
    "train_peak_memory_mb",
    "model_size_mb",
)


class TrialStoppedError(RuntimeError):
    """The trial stopped itself (e.g. a non-finite loss); the reason is on its MLflow run."""


def _result_metrics(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if (k in RESULT_METRICS or (k.startswith("lmeval_") and k.endswith("_acc"))) and v is not None
    }


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (else RAY_ADDRESS) if given, otherwise start a private local instance: a bare
    ray.init() would join whichever cluster another process on this machine started last."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


def private_cache_path(storage_path: str, run_name: str) -> Path:
    """Where a trial that shares no cache keeps its stages (reused only by its own restarts): beside its
    checkpoints when storage is a local/shared path, else in a node-local temp dir."""
    if "://" in storage_path:
        return Path(tempfile.gettempdir()) / "quailora_stages" / run_name
    return Path(storage_path) / run_name / "stages"


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
) -> dict[str, float]:
    """Validate, then fine-tune and evaluate one trial; returns its final metrics.

    A retry or a second call with the same config reuses the trial's MLflow run and resumes from its last
    Ray Train checkpoint; a trial whose run already finished returns the recorded metrics. ``cache_path``:
    the stage cache this trial shares with others (trials/cache.py); None keeps its stages private.
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
    if run.info.status == "FINISHED":
        return _result_metrics(run.data.metrics)

    storage_path = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    run_name = f"{config.name}_{trial_key(config)}"
    ensure_ray()
    trainer = TorchTrainer(
        train_trial,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "checkpoint": str(plan.checkpoint),
            "target_names": plan.target_names,
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "cache_path": str(cache_path or private_cache_path(storage_path, run_name)),
        },
        scaling_config=scaling_config(config),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        mark_failed(client, run_id, f"{type(err).__name__}: {err}")
        raise
    reason = client.get_run(run_id).data.tags.get(FAILURE_TAG)  # set by rank 0 when the trial stops itself
    if reason:
        raise TrialStoppedError(f"trial {config.name!r} stopped: {reason}")
    client.set_terminated(run_id, status="FINISHED")
    return _result_metrics(result.metrics)
