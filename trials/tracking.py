"""MLflow bookkeeping of one trial: one run per trial, found again (not duplicated) after a retry or resume.

The client API (not ``mlflow.start_run``) keeps every call explicit about its run id, so the driver and
the rank-0 worker can log to the same run without sharing a global active run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, TypeAdapter, ValidationError

from quailora.supported_architectures import support
from trials.config import TrialConfig
from trials.contract import (
    ARCHITECTURE_TAG,
    BITS_TAG,
    FAILURE_TAG,
    FAMILY_TAG,
    METHOD_TAG,
    QUANTIZER_TAG,
    RANK_TAG,
    SIZE_TAG,
    STOPPED_EARLY_TAG,
    TRIAL_KEY_TAG,
    TRIAL_NAME_TAG,
)

if TYPE_CHECKING:  # mlflow is imported where a run is touched: `quailora plan` needs only the paths here
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own
_BATCH = 100  # MLflow's log_batch limit on params per call


def default_tracking_uri(root: str | Path) -> str:
    """The embedded store: SQLite in ``root`` (artifacts go next to it, see ``ensure_experiment``)."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local artifacts beside a SQLite store; None lets a tracking server choose its own."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    return None


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))


def trial_key(config: TrialConfig) -> str:
    """Identity of a trial: the hash of its whole config (same config, same run and checkpoints)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def flat_params(config: TrialConfig) -> dict[str, str]:
    """Every config field as ``section.field`` -> value (lists and dicts as JSON)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value and prefix not in ("init.options", "tags"):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else str(value)

    walk("", config.model_dump(mode="json"))
    return flat


def config_from_params(params: dict[str, str]) -> TrialConfig:
    """The TrialConfig a run was logged with: the inverse of flat_params. Each value is read as JSON when
    that fits its field (numbers, lists, options), else as the string it is ("None" for an unset optional)."""

    def parse(raw: str, adapter: TypeAdapter):
        candidates = [None] if raw == "None" else []
        with contextlib.suppress(ValueError):
            candidates.append(json.loads(raw))
        for value in [*candidates, raw]:
            with contextlib.suppress(ValidationError):
                return adapter.validate_python(value)
        return raw  # TrialConfig's validation names the field and value

    def section(model: type[BaseModel], prefix: str) -> dict:
        values = {}
        for name, field in model.model_fields.items():
            key, kind = f"{prefix}{name}", field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                values[name] = section(kind, f"{key}.")
            elif key in params:
                values[name] = parse(params[key], TypeAdapter(kind))
        return values

    return TrialConfig.model_validate(section(TrialConfig, ""))


def _size_label(num_parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num_parameters >= scale:
            return f"{num_parameters / scale:.3g}{unit}"
    return str(num_parameters)


def trial_tags(config: TrialConfig, family: str, num_parameters: int) -> dict[str, str]:
    return {
        FAMILY_TAG: family,
        ARCHITECTURE_TAG: support(family),
        SIZE_TAG: _size_label(num_parameters),
        BITS_TAG: str(config.quant.bits),
        QUANTIZER_TAG: config.quant.method,
        METHOD_TAG: config.init.method,
        RANK_TAG: str(config.lora.rank),
        TRIAL_NAME_TAG: config.name,
        **config.tags,
    }


def find_run(client: MlflowClient, experiment_id: str, key: str, parent_run_id: str | None):
    """The run of this trial (same key, same parent), if a previous attempt created one. A standalone
    trial matches only runs without a parent, so it never adopts a sweep's child run of the same config."""
    parent = f"= '{parent_run_id}'" if parent_run_id else "IS NULL"
    query = f"tags.`{TRIAL_KEY_TAG}` = '{key}' and tags.`{PARENT_TAG}` {parent}"
    runs = client.search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def open_trial_run(
    client: MlflowClient,
    experiment_id: str,
    config: TrialConfig,
    tags: dict[str, str],
    parent_run_id: str | None,
):
    """Reuse this trial's run if there is one, else create it with every param and tag. Returns the run.

    A reused run is set RUNNING again, unless it finished or the sweep's scheduler stopped it (both stay as
    they are: the trial does not run again)."""
    from mlflow.entities import RunStatus

    key = trial_key(config)
    run = find_run(client, experiment_id, key, parent_run_id)
    if run is not None:
        if run.info.status != "FINISHED" and STOPPED_EARLY_TAG not in run.data.tags:
            if FAILURE_TAG in run.data.tags:  # an earlier attempt's reason does not apply to this one
                client.delete_tag(run.info.run_id, FAILURE_TAG)
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return client.get_run(run.info.run_id)
    from mlflow.entities import Param

    run_tags = {**tags, TRIAL_KEY_TAG: key, **({PARENT_TAG: parent_run_id} if parent_run_id else {})}
    run = client.create_run(experiment_id, run_name=config.name, tags=run_tags)
    params = [Param(k, v) for k, v in flat_params(config).items()]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run.info.run_id, params=params[start : start + _BATCH])
    return run


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int
) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()])


def mark_failed(client: MlflowClient, run_id: str, reason: str) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(FAILURE_TAG, reason[:5000])])
    client.set_terminated(run_id, status="FAILED")
