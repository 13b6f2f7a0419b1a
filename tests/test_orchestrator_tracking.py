"""The sweep's MLflow bookkeeping: runs of trials the scheduler stopped early are ended and counted, and the
report is built from the finished runs' tags, swept params and metrics."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orchestrator.experiment import ExperimentState
from orchestrator.report import publish_report
from orchestrator.status import experiments_table
from orchestrator.sweep_config import SweepConfig
from orchestrator.tracking import STOPPED_EARLY_TAG, TRIAL_ID_TAG, end_stopped_runs, ensure_parent_run
from trials.tracking import PARENT_TAG


def test_runs_of_early_stopped_trials_end_killed_and_tagged(tmp_path):
    sweep = SweepConfig.model_validate(
        {"name": "asha", "base": {"model": {"path": "reference:llama-micro"}}, "space": {"seed": {"grid": [0]}},
         "storage_path": str(tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )  # fmt: skip
    state = ExperimentState.for_sweep(sweep)
    client = MlflowClient(state.tracking_uri)
    state.parent_run_id = ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, None)
    state.save()
    experiment_id = client.get_run(state.parent_run_id).info.experiment_id

    def child(trial_id: str, status: str | None = None) -> str:
        run = client.create_run(experiment_id, tags={PARENT_TAG: state.parent_run_id, TRIAL_ID_TAG: trial_id})
        if status:
            client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    stopped, finished, errored = child("a"), child("b", "FINISHED"), child("c")
    # Tune ended a and b without error; c errored (Tune retries it on resume), so its run is left alone.
    assert end_stopped_runs(client, state.parent_run_id, {"a", "b"}) == 1
    runs = {rid: client.get_run(rid) for rid in (stopped, finished, errored)}
    assert runs[stopped].info.status == "KILLED" and runs[stopped].data.tags[STOPPED_EARLY_TAG] == "true"
    assert runs[finished].info.status == "FINISHED" and STOPPED_EARLY_TAG not in runs[finished].data.tags
    assert runs[errored].info.status == "RUNNING"

    (row,) = experiments_table(str(tmp_path)).to_dict("records")
    assert (row["finished"], row["running"], row["failed"], row["stopped early"]) == (1, 1, 0, 1)


def test_published_report_matches_runs_on_their_swept_params(tmp_path):
    sweep = SweepConfig.model_validate(
        {"name": "rep", "base": {"model": {"path": "reference:llama-micro"}},
         "space": {"lora.alpha": {"grid": [16, 32]}, "init.method": {"grid": ["gaussian", "quailora"]},
                   "quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]}},
         "storage_path": str(tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )  # fmt: skip
    state = ExperimentState.for_sweep(sweep)
    client = MlflowClient(state.tracking_uri)
    state.parent_run_id = ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, None)
    experiment_id = client.get_run(state.parent_run_id).info.experiment_id

    def child(method: str, bits: int, alpha: str, ppl: float, status: str = "FINISHED") -> None:
        quantizer = "nf4" if bits == 4 else "int8"
        tags = {PARENT_TAG: state.parent_run_id, "family": "llama", "size": "1M", "bits": str(bits),
                "method": method, "rank": "8", "seed": "0", "quantizer": quantizer}  # fmt: skip
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        for key, value in {"lora.alpha": alpha, "init.method": method, "quant.method": quantizer}.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "val_ppl_final", ppl)
        client.set_terminated(run_id, status=status)

    for alpha, (p4, p8, quail) in {"16": (20.0, 10.0, 15.0), "32": (10.0, 10.0, 9.0)}.items():
        child("gaussian", 4, alpha, p4)
        child("gaussian", 8, alpha, p8)
        child("quailora", 4, alpha, quail)
    child("quailora", 4, "16", 1.0, status="KILLED")  # stopped early: not a result

    text = publish_report(client, state)
    assert "| perplexity | llama    | 1M     | quailora |      8 |           16 |            0.500 |" in text
    assert "| perplexity | llama    | 1M     | quailora |      8 |           32 |          n/a     |" in text
    metrics = client.get_run(state.parent_run_id).data.metrics
    assert metrics == {"recovered_perplexity_llama_1M_quailora_r8_lora.alpha-16": 0.5}  # none for n/a

    for run in client.search_runs([experiment_id], "tags.bits = '8'"):
        client.delete_run(run.info.run_id)
    assert "needs 4-bit and 8-bit gaussian trials" in publish_report(client, state)  # no 8-bit peer left
