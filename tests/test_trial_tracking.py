"""Which MLflow run a trial reuses (no Ray, no DeepSpeed engine)."""

from __future__ import annotations

import ray
from mlflow.tracking import MlflowClient

from testkit.micro import micro_trial_config
from trials.contract import STOPPED_EARLY_TAG, VAL_PPL, VAL_PPL_INIT
from trials.run import run_trial
from trials.tracking import PARENT_TAG, default_tracking_uri, find_run, open_trial_run, trial_key


def _store_with_a_sweep(micro_trial, tmp_path):
    """A micro trial's config, a local MLflow store, an experiment in it and a sweep's parent run."""
    config = micro_trial_config(*micro_trial)
    client = MlflowClient(default_tracking_uri(tmp_path))
    experiment_id = client.create_experiment("x")
    return config, client, experiment_id, client.create_run(experiment_id).info.run_id


def test_standalone_trial_never_adopts_a_sweep_child_run(micro_trial, tmp_path):
    config, client, experiment_id, parent = _store_with_a_sweep(micro_trial, tmp_path)
    child = open_trial_run(client, experiment_id, config, {}, parent)
    assert child.data.tags[PARENT_TAG] == parent

    assert find_run(client, experiment_id, trial_key(config), None) is None
    standalone = open_trial_run(client, experiment_id, config, {}, None)
    assert standalone.info.run_id != child.info.run_id and PARENT_TAG not in standalone.data.tags
    assert find_run(client, experiment_id, trial_key(config), None).info.run_id == standalone.info.run_id
    assert find_run(client, experiment_id, trial_key(config), parent).info.run_id == child.info.run_id
    other_sweep = client.create_run(experiment_id).info.run_id
    assert find_run(client, experiment_id, trial_key(config), other_sweep) is None


def test_a_trial_the_sweep_scheduler_stopped_is_not_trained_again(micro_trial, tmp_path):
    """What a resumed sweep does with a trial whose stop its Tune state missed: the run stays as it ended."""
    config, client, experiment_id, parent = _store_with_a_sweep(micro_trial, tmp_path)
    run_id = open_trial_run(client, experiment_id, config, {}, parent).info.run_id
    client.log_metric(run_id, VAL_PPL_INIT, 9.0, step=0)
    client.log_metric(run_id, VAL_PPL, 7.0, step=4)
    client.set_tag(run_id, STOPPED_EARLY_TAG, "true")
    client.set_terminated(run_id, status="KILLED")
    stopped = client.get_run(run_id)

    metrics = run_trial(
        config,
        tracking_uri=default_tracking_uri(tmp_path),
        experiment_name="x",
        storage_path=str(tmp_path / "ray"),
        parent_run_id=parent,
    )
    assert metrics == {VAL_PPL_INIT: 9.0}  # its recorded result metrics, without training
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    again = client.get_run(run_id)
    assert (again.info.status, again.info.end_time) == ("KILLED", stopped.info.end_time)
