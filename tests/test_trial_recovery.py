"""A trial that dies after a checkpoint resumes from it (its throughput figures cumulative over both
attempts); a non-finite loss stops a trial with its reason.

Both log to the embedded default store (local SQLite + local artifacts), the setting `quailora trial` uses.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from testkit.micro import make_texts, make_trial_checkpoint, micro_trial_config
from trials.config import TrialConfig
from trials.contract import FAILURE_TAG, STAGES, stage_tag
from trials.run import TrialStoppedError, run_trial
from trials.tracking import default_tracking_uri

pytestmark = pytest.mark.slow


class DieAfterFirstCheckpoint(UserCallback):
    """Takes the trial down (as a killed driver would) once the first checkpoint is persisted."""

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            raise RuntimeError("simulated crash after a checkpoint")


class DieAfterFinalCheckpoint(UserCallback):
    """Takes the trial down once the checkpoint of its last step is persisted, before the run finishes."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and metrics[0]["step"] == self.max_steps:
            raise RuntimeError("simulated crash after the final checkpoint")


def _tokens(config: TrialConfig) -> int:
    """Tokens a whole trial trains on: steps x accumulation x micro-batch x sequence x workers."""
    train = config.train
    return (
        train.max_steps
        * train.grad_accum
        * train.batch_size
        * config.data.seq_len
        * config.resources.num_workers
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("recovery")
    # Beyond llama, a MoE runs the full Ray trial: split experts calibrated, quantized and adapted.
    return root, make_trial_checkpoint(root / "ckpt", family="mixtral"), make_texts(root)


def _only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, "a retried trial must reuse its MLflow run"
    return runs[0]


def test_killed_trial_resumes_from_its_last_checkpoint(setup):
    root, checkpoint, texts = setup
    # A calibrated plain-LoRA method on the group-wise INT-3 base: the Grams are collected once and reused.
    config = micro_trial_config(
        checkpoint,
        texts,
        quant={"method": "int", "bits": 3, "group_size": 32},
        init={"method": "quailora", "options": {"iterations": 2}},
        train={"max_steps": 4, "checkpoint_every": 2},
    )
    uri, storage = default_tracking_uri(root), str(root / "ray")
    with pytest.raises(Exception, match="simulated crash"):
        run_trial(config, tracking_uri=uri, experiment_name="recovery", storage_path=storage,
                  callbacks=[DieAfterFirstCheckpoint()])  # fmt: skip
    client = MlflowClient(uri)
    crashed = _only_run(client, "recovery")
    assert crashed.info.status == "FAILED" and "simulated crash" in crashed.data.tags[FAILURE_TAG]
    assert {m.step for m in client.get_metric_history(crashed.info.run_id, "train_loss")} >= {1, 2}

    # The second attempt dies too, after its final checkpoint: the third trains nothing and still reports
    # the training both earlier attempts did, carried in the checkpoint.
    with pytest.raises(Exception, match="simulated crash after the final checkpoint"):
        run_trial(config, tracking_uri=uri, experiment_name="recovery", storage_path=storage,
                  callbacks=[DieAfterFinalCheckpoint(config.train.max_steps)])  # fmt: skip
    second = client.get_metric_history(_only_run(client, "recovery").info.run_id, "resumed_from_step")
    assert 2 in [m.value for m in second]  # (the first attempt's workers may also have logged 0)
    metrics = run_trial(config, tracking_uri=uri, experiment_name="recovery", storage_path=storage)
    run = _only_run(client, "recovery")
    assert run.info.status == "FINISHED" and FAILURE_TAG not in run.data.tags
    assert run.data.metrics["resumed_from_step"] == 4
    # (The crashed attempt's workers may log a step or two past the checkpoint before they are stopped.)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps.count(1) == steps.count(2) == 1, "steps before the checkpoint were trained again"
    assert steps[-2:] == [3, 4]
    assert 1 < metrics["val_ppl_final"] < 2 * 320 and metrics["model_size_mb"] > 0
    # Steps 1-2 ran in the first attempt, 3-4 in the second: their tokens come back with the checkpoint.
    assert metrics["train_seconds"] > 0
    assert metrics["tokens_per_second"] * metrics["train_seconds"] == pytest.approx(_tokens(config))
    # Calibration and init were computed once, by the first attempt; the last attempt reused both. A MoE's
    # quantized base (experts split after loading) has no stock saved form, so every attempt quantizes it.
    assert len(list((root / "ray").rglob("grams.index.json"))) == 1
    assert {s: run.data.tags[stage_tag(s)] for s in STAGES} == {
        "quantize": "computed", "calibrate": "reused", "initialize": "reused",
    }  # fmt: skip
    assert metrics["calibrate_saved_seconds"] > 0 and metrics["initialize_saved_seconds"] > 0


def test_non_finite_loss_stops_the_trial_with_the_reason_on_its_run(setup):
    root, checkpoint, texts = setup
    # Adam moves every weight by ~lr on the first step: lr=1e30 makes B·A overflow and the next loss NaN.
    config = micro_trial_config(
        checkpoint,
        texts,
        name="diverges",
        init={"method": "gaussian"},
        train={"max_steps": 6, "learning_rate": 1e30, "checkpoint_every": 0},
        resources={"num_workers": 1},
    )
    uri = default_tracking_uri(root / "nonfinite")
    with pytest.raises(TrialStoppedError, match="non-finite loss"):
        run_trial(config, tracking_uri=uri, experiment_name="nonfinite", storage_path=str(root / "ray"))
    client = MlflowClient(uri)
    run = _only_run(client, "nonfinite")
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG].startswith("non-finite loss: train_loss=nan at step ")
    assert run.data.metrics["stopped_nonfinite_loss"] == 1
    assert "val_ppl_final" not in run.data.metrics


def test_workers_that_cannot_start_fail_the_trial_after_its_start_timeout(setup):
    """Issue 26 item 9(a): Ray Train retries a worker group that cannot start forever by default (seen after a
    node loss left a 2-worker trial room for one). Three 1-CPU workers on 2 CPUs never start: the trial
    fails after resources.start_timeout_s with Ray's startup error on its run."""
    import time

    root, checkpoint, texts = setup
    config = micro_trial_config(checkpoint, texts, name="cannot-start",
                                resources={"num_workers": 3, "start_timeout_s": 4})  # fmt: skip
    uri = default_tracking_uri(root / "cannot-start")
    began = time.monotonic()
    with pytest.raises(Exception, match="(?i)start"):
        run_trial(config, tracking_uri=uri, experiment_name="cannot-start", storage_path=str(root / "ray"))
    assert time.monotonic() - began < 60
    run = _only_run(MlflowClient(uri), "cannot-start")
    assert run.info.status == "FAILED" and "start" in run.data.tags[FAILURE_TAG].lower(), run.data.tags


def test_a_stage_job_without_free_slots_waits_narrower_until_one_frees(setup, capsys):
    """The sweep's running trials hold every worker slot: the stage job's worker group times out starting,
    which its service does not count as a failure (a node could hold a worker); it asks again with half the
    workers, and the job runs once a slot frees (orchestrator/stage_service.py)."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.stage_service import _RemoteStageService

    root, checkpoint, texts = setup
    config = micro_trial_config(checkpoint, texts, name="no-slot",
                                resources={"num_workers": 1, "cpus_per_worker": 1, "start_timeout_s": 3})  # fmt: skip
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])  # what running trials would hold
    ray.get(held.ready())
    try:
        service = _RemoteStageService({"job": [config.model_dump(mode="json")]}, 1, 2,
                                      storage_path=str(root / "stages"), cache_path=str(root / "cache"))  # fmt: skip
        deadline, said = time.monotonic() + 180, ""
        while "no free worker slot yet; asking for 1" not in said and time.monotonic() < deadline:
            time.sleep(1)  # the attempt at 2 workers times out 3 s after its controller starts
            said += capsys.readouterr().out
        assert "stage job job: no free worker slot yet; asking for 1" in said, said[-2000:]
        assert "job" not in service.records()
    finally:
        remove_placement_group(held)
    record = service.wait("job")
    assert record["status"] == "done" and record["attempts"] == 1, record
    assert record["waits"] >= 1 and record["workers"] == 1
    assert {s["status"] for s in record["records"][0].values()} == {"computed"}
