"""The sweep's MLflow bookkeeping: runs of trials the scheduler stopped early are ended and counted, and the
report is built from the finished runs' tags, swept params and metrics."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.experiment import ExperimentState
from orchestrator.report import publish_report
from orchestrator.status import experiments_table, seconds_per_trial
from orchestrator.sweep_config import SweepConfig
from orchestrator.tracking import ensure_parent_run, mark_interrupted, mark_stopped_early
from quailora.errors import QuailoraInputError
from trials.contract import STOPPED_AT_STEP, STOPPED_EARLY_TAG, TRIAL_ID_TAG, VAL_PPL
from trials.tracking import PARENT_TAG


def _experiment(tmp_path, name: str, space: dict) -> ExperimentState:
    """A sweep of the micro model over `space`, stored (with its MLflow store) under tmp_path."""
    sweep = SweepConfig.model_validate(
        {"name": name, "base": {"model": {"path": "reference:llama-micro"}}, "space": space,
         "storage_path": str(tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )  # fmt: skip
    return ExperimentState.for_sweep(sweep)


def test_runs_of_early_stopped_trials_end_killed_and_tagged(tmp_path):
    state = _experiment(tmp_path, "asha", {"seed": {"grid": [0]}})
    client = MlflowClient(state.tracking_uri)
    state.parent_run_id = ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, None)
    state.save()
    experiment_id = client.get_run(state.parent_run_id).info.experiment_id

    def child(trial_id: str, status: str | None = None) -> str:
        run = client.create_run(experiment_id, tags={PARENT_TAG: state.parent_run_id, TRIAL_ID_TAG: trial_id})
        client.log_metric(run.info.run_id, VAL_PPL, 50.0, step=10)
        if status:
            client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    stopped, finished, running, interrupted = (
        child("a"),
        child("b", "FINISHED"),
        child("c"),
        child("d", "KILLED"),
    )
    assert mark_stopped_early(client, state.parent_run_id, "a", 10)
    assert not mark_stopped_early(client, state.parent_run_id, "no-such-trial", 10)
    runs = {rid: client.get_run(rid) for rid in (stopped, finished, running, interrupted)}
    assert runs[stopped].info.status == "KILLED" and runs[stopped].data.tags[STOPPED_EARLY_TAG] == "true"
    assert runs[stopped].data.metrics == {VAL_PPL: 50.0, STOPPED_AT_STEP: 10}  # its partial metrics stay
    assert all(STOPPED_EARLY_TAG not in runs[r].data.tags for r in (finished, running, interrupted))

    (row,) = experiments_table(str(tmp_path)).to_dict("records")
    counts = ("finished", "running", "failed", "stopped early", "interrupted")
    assert tuple(row[c] for c in counts) == (1, 1, 0, 1, 1)
    assert row["trials"] == 1 and row["time left (est.)"] == "0 h"  # one grid point, ended


def test_an_interrupted_sweep_and_the_trial_runs_it_left_running_end_killed_and_show_interrupted(tmp_path):
    state = _experiment(tmp_path, "paused", {"seed": {"grid": [0, 1, 2]}})
    client = MlflowClient(state.tracking_uri)
    state.parent_run_id = ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, None)
    state.save()
    experiment_id = client.get_run(state.parent_run_id).info.experiment_id
    tags = {PARENT_TAG: state.parent_run_id}
    running = client.create_run(experiment_id, tags={**tags, TRIAL_ID_TAG: "a"}).info.run_id
    finished = client.create_run(experiment_id, tags={**tags, TRIAL_ID_TAG: "b"}).info.run_id
    client.set_terminated(finished, status="FINISHED")

    assert mark_interrupted(client, state.parent_run_id) == 1
    assert (
        client.get_run(running).info.status == "KILLED" and client.get_run(finished).info.status == "FINISHED"
    )
    (row,) = experiments_table(str(tmp_path)).to_dict("records")
    assert (row["sweep"], row["running"], row["interrupted"], row["finished"]) == ("INTERRUPTED", 0, 1, 1)
    # resume reopens the sweep
    ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, state.parent_run_id)
    assert experiments_table(str(tmp_path)).loc[0, "sweep"] == "RUNNING"


def test_an_experiment_whose_stored_config_no_longer_validates_is_listed_uncounted(tmp_path):
    state = _experiment(tmp_path, "old", {"seed": {"grid": [0]}})
    state.sweep["retired_field"] = 1  # written by a version that had it
    state.save()
    (row,) = experiments_table(str(tmp_path)).to_dict("records")
    assert row["experiment"] == "old" and row["sweep"] == "NOT STARTED"
    assert row["trials"] is None and row["time left (est.)"] == "n/a"


def test_the_pace_counts_overlapping_trials_once_and_idle_gaps_not_at_all():
    # two trials side by side for 100 s, an interrupted sweep idle for 1000 s, then one alone for 100 s
    assert seconds_per_trial([(0, 100), (0, 100), (1100, 1200)]) == pytest.approx(200 / 3)
    assert seconds_per_trial([(0, 100), (50, 150)]) == pytest.approx(75)  # half overlapping
    assert seconds_per_trial([]) is None


def test_published_report_matches_runs_on_their_swept_params(tmp_path):
    state = _experiment(
        tmp_path,
        "rep",
        {"lora.alpha": {"grid": [16, 32]}, "init.method": {"grid": ["gaussian", "quailora"]},
         "quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]}},
    )  # fmt: skip
    client = MlflowClient(state.tracking_uri)
    state.parent_run_id = ensure_parent_run(client, state.name, state.tracking_uri, state.sweep, None)
    experiment_id = client.get_run(state.parent_run_id).info.experiment_id

    def child(method: str, bits: int, alpha: str, ppl: float, trial_id: str = "") -> None:
        quantizer = "nf4" if bits == 4 else "int8"
        tags = {PARENT_TAG: state.parent_run_id, "family": "llama", "size": "1M", "bits": str(bits),
                "method": method, "rank": "8", "seed": "0", "quantizer": quantizer, TRIAL_ID_TAG: trial_id}  # fmt: skip
        run_id = client.create_run(experiment_id, tags=tags, run_name=f"{method}_{bits}_{alpha}").info.run_id
        params = {
            "lora.alpha": alpha,
            "init.method": method,
            "quant.method": quantizer,
            "train.max_steps": "4",
        }
        for key, value in params.items():
            client.log_param(run_id, key, value)
        if trial_id:  # a trial the scheduler stops while it runs: partial metrics only
            client.log_metric(run_id, VAL_PPL, ppl, step=3)
            assert mark_stopped_early(client, state.parent_run_id, trial_id, 3)
        else:
            for step, value in ((0, ppl + 5), (2, ppl + 1)):  # the learning curve: init and an eval point
                client.log_metric(run_id, VAL_PPL, value, step=step)
            client.log_metric(run_id, "val_ppl_final", ppl, step=4)
            client.set_terminated(run_id, status="FINISHED")

    for alpha, (p4, p8, quail) in {"16": (20.0, 10.0, 15.0), "32": (10.0, 10.0, 9.0)}.items():
        child("gaussian", 4, alpha, p4)
        child("gaussian", 8, alpha, p8)
        child("quailora", 4, alpha, quail)
    child("quailora", 4, "16", 1.0, trial_id="t1")  # stopped early: listed apart, not a result

    text = publish_report(client, state)
    assert "Stopped early by the scheduler" in text and "| quailora_4_16 |                 3 |" in text
    # 6 finished trials of 4 steps and the stopped one at step 3 of its 4
    assert "1 of 7 trials stopped early: the sweep trained 27 of the 28 optimizer steps" in text
    rows = [line for line in text.splitlines() if line.startswith("| perplexity ")]
    assert "|           16 | quailora | nf4         |       1 | -5.000 (one seed: no interval)" in rows[0]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    # recovered, CI contains 0, and the Holm p-values: one seed, no test
    assert cells[-4:] == ["0.500 (one seed: no interval)", "", "n/a", "n/a"]
    assert "|           32 |" in rows[1] and "| n/a " in rows[1]
    metrics = client.get_run(state.parent_run_id).data.metrics
    assert metrics == {"recovered_perplexity_llama_1M_quailora_r8_lora.alpha-16": 0.5}  # none for n/a
    report_files = {a.path for a in client.list_artifacts(state.parent_run_id, "report")}
    assert "report/learning_curves.png" in report_files  # from the runs' val_ppl histories

    for run in client.search_runs([experiment_id], "tags.bits = '8'"):
        client.delete_run(run.info.run_id)
    assert "needs 4-bit and 8-bit gaussian trials" in publish_report(client, state)  # no 8-bit peer left


def _sweep_state(tmp_path, name: str, space: dict, **base) -> ExperimentState:
    sweep = SweepConfig.model_validate(
        {"name": name, "base": {"model": {"path": "reference:llama-micro"}, **base}, "space": space,
         "storage_path": str(tmp_path), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    )  # fmt: skip
    state = ExperimentState.for_sweep(sweep)
    state.parent_run_id = ensure_parent_run(
        MlflowClient(state.tracking_uri), state.name, state.tracking_uri, state.sweep, None
    )
    return state


def test_a_follow_up_sweep_joins_the_report_and_may_differ_only_in_swept_fields(tmp_path, capsys):
    """The follow-up runs 1.5e-3 for arms whose choice landed on the lower edge of {3e-3, 6e-3}: in the joined
    report each arm's rate is chosen over all three, and the edge column says when it is still the lowest."""
    space = {"init.method": {"grid": ["gaussian", "quailora"]},
             "quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]}}  # fmt: skip
    first = _sweep_state(tmp_path, "rates", {**space, "train.learning_rate": {"grid": [3e-3, 6e-3]}})
    follow_up = _sweep_state(tmp_path, "rates-low", space, train={"learning_rate": 1.5e-3})
    client = MlflowClient(first.tracking_uri)

    def child(state: ExperimentState, method: str, bits: int, rate: float, ppl: float) -> None:
        quantizer = "nf4" if bits == 4 else "int8"
        tags = {PARENT_TAG: state.parent_run_id, "family": "llama", "size": "1M", "bits": str(bits),
                "method": method, "rank": "8", "seed": "0", "quantizer": quantizer}  # fmt: skip
        experiment_id = client.get_run(state.parent_run_id).info.experiment_id
        run_id = client.create_run(experiment_id, tags=tags, run_name=f"{method}_{bits}_{rate}").info.run_id
        for key, value in {"init.method": method, "quant.method": quantizer, "quant.bits": str(bits),
                           "train.learning_rate": str(rate), "train.max_steps": "4"}.items():  # fmt: skip
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "val_ppl_final", ppl, step=4)
        client.set_terminated(run_id, status="FINISHED")

    for method, bits, (high, mid, low) in [("gaussian", 8, (12.0, 10.0, 11.0)), ("gaussian", 4, (14.0, 13.0, 12.0)),
                                           ("quailora", 4, (13.0, 11.0, 11.5))]:  # fmt: skip
        child(first, method, bits, 6e-3, high)
        child(first, method, bits, 3e-3, mid)
        child(follow_up, method, bits, 1.5e-3, low)

    text = publish_report(client, first, [follow_up])
    chosen = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[4] in ("gaussian", "quailora") and cells[9] == "3":  # rates compared
            chosen[(cells[4], cells[3])] = (float(cells[6]), cells[10])
    assert chosen == {("gaussian", "8"): (0.003, ""), ("gaussian", "4"): (0.0015, "lowest"),
                      ("quailora", "4"): (0.003, "")}, text  # fmt: skip
    assert "quailora sweep rates + rates-low" in (tmp_path / "rates" / "report" / "report.html").read_text()

    first.save()
    follow_up.save()
    capsys.readouterr()
    assert main(["report", "rates", "--with", "rates-low", "--storage", str(tmp_path)]) == 0
    assert "|                3 | lowest " in capsys.readouterr().out

    other = _sweep_state(tmp_path, "longer", space, train={"learning_rate": 1.5e-3, "max_steps": 8})
    with pytest.raises(
        QuailoraInputError, match=r"--with longer: train.max_steps is 8 there and \d+ in rates"
    ):
        publish_report(client, first, [other])
