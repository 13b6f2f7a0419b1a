"""End to end on the micro reference model: a two-trial sweep, an ASHA sweep, resume after the driver is killed,
and after it is interrupted (Ctrl-C).

Real trials (quantized micro llama, DeepSpeed on Ray Train, MLflow in SQLite); slow on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.experiment import STATE_FILE, ExperimentState
from orchestrator.tracking import STAGE_JOBS_ARTIFACT, child_runs
from trials.contract import STOPPED_AT_STEP, STOPPED_EARLY_TAG, TRAIN_LOSS, VAL_PPL, stage_param, stage_tag

pytestmark = pytest.mark.slow

MICRO_BASE = {
    "model": {"path": "reference:llama-micro"},
    "calibration": {"num_sequences": 4, "seq_len": 32},
    "data": {"seq_len": 32, "max_eval_sequences": 4},
    "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
}


def _sweep(tmp_path: Path, name: str, space: dict, base: dict = MICRO_BASE, **extra) -> str:
    sweep = {"name": name, "base": base, "space": space, "driver_cpus": 0.05, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


STARTED = "] started "  # ProgressCallback's line when Tune starts a trial


def _started_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if STARTED in line]


def _status_row(text: str, experiment: str) -> dict[str, str]:
    """`quailora status`'s row of one experiment, by column name."""
    lines = text.splitlines()
    header = next(line for line in lines if "| experiment " in line)
    row = next(line for line in lines if line.startswith(f"| {experiment} "))
    return {h.strip(): c.strip() for h, c in zip(header.split("|"), row.split("|"), strict=True)}


def _children(state: ExperimentState):
    return child_runs(MlflowClient(state.tracking_uri), state.parent_run_id)


def test_two_trial_sweep_end_to_end_then_resume_reruns_nothing(tmp_path, monkeypatch, capsys, local_ray):
    monkeypatch.chdir(tmp_path)
    # A grid field and a sampled one: trials are named by both, and never averaged over the sampled one.
    space = {
        "init.method": {"grid": ["gaussian", "quailora"]},
        "train.learning_rate": {"loguniform": [1e-4, 1e-3]},
    }
    config = _sweep(tmp_path, "e2e", space, search={"algorithm": "random", "seed": 0})
    assert main(["run", config]) == 0
    out = capsys.readouterr().out
    started = _started_lines(out)
    assert len(started) == 2 and all("method=" in line and "_learning_rate=0.000" in line for line in started)
    assert "| quailora " in out and "ppl after fine-tuning" in out  # the comparison table

    state = ExperimentState.load("e2e")
    client = MlflowClient(state.tracking_uri)
    assert client.get_run(state.parent_run_id).info.status == "FINISHED"
    runs = _children(state)
    assert sorted(r.data.tags["method"] for r in runs) == ["gaussian", "quailora"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["family"] == "llama" and run.data.tags["bits"] == "4"
        assert math.isfinite(run.data.metrics["val_ppl_final"]) and run.data.metrics["val_ppl_final"] > 1
        # the held-out test split, scored once at the end: not the validation number again
        assert 1 < run.data.metrics["test_ppl_final"] != run.data.metrics["val_ppl_final"]
        rate = float(run.data.params["train.learning_rate"])
        assert run.info.run_name == f"method={run.data.tags['method']}_learning_rate={rate:.3g}"
        assert any(run.info.run_name in line for line in started)  # progress lines name trials as MLflow does
    report_files = {a.path for a in client.list_artifacts(state.parent_run_id, "report")}
    assert {"report/report.html", "report/ppl_vs_rank.png", "report/learning_curves.png"} <= report_files
    assert (Path(state.path) / "report" / "report.html").is_file()
    # Both trials quantize the same model the same way: one computed it, the other reused the entry
    # (waiting for it if they ran at once); only quailora calibrates; each init is its own.
    tags = {r.data.tags["method"]: r.data.tags for r in runs}
    assert sorted(t[stage_tag("quantize")] for t in tags.values()) == ["computed", "reused"]
    assert (tags["gaussian"][stage_tag("calibrate")], tags["quailora"][stage_tag("calibrate")]) == (
        "skipped", "computed",
    )  # fmt: skip
    assert "Cached stages" in out
    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert "4 entries" in listing and listing.count("initialize ") == 2 and "method=nf4" in listing

    assert main(["status"]) == 0
    status = capsys.readouterr().out
    assert "| e2e " in status and "FINISHED" in status
    assert main(["report", "e2e"]) == 0 and "| quailora " in capsys.readouterr().out

    before = {r.info.run_id: r.info.end_time for r in runs}
    assert main(["resume", "e2e"]) == 0
    assert STARTED not in capsys.readouterr().out  # Tune restored both trials as finished and started none
    after = {r.info.run_id: r.info.end_time for r in _children(state)}
    assert after == before  # the same two runs, neither ended again


def test_shared_stages_are_computed_once_ahead_of_the_trials_that_need_them(
    tmp_path, monkeypatch, capsys, local_ray
):
    """Issue 28: four trials share one calibration (two ranks x two learning rates). The sweep computes it and
    both init keys in one stage job before the trials, which then find every stage `precomputed`: the
    planned keys are the keys the trials use, and no trial starts before its stages are ready."""
    from orchestrator.expand import expand
    from orchestrator.stage_graph import plan_stage_graph
    from orchestrator.sweep_config import load_sweep
    from trials.contract import STAGE_WAIT_SECONDS

    monkeypatch.chdir(tmp_path)
    space = {"lora.rank": {"grid": [4, 8]}, "train.learning_rate": {"grid": [1e-3, 3e-3]}}
    config = _sweep(tmp_path, "ahead", space, base={**MICRO_BASE, "init": {"method": "quailora"}},
                    search={"max_concurrent_trials": 2})  # fmt: skip
    graph = plan_stage_graph(expand(load_sweep(config)))
    assert len(graph.jobs) == 1 and not graph.on_demand
    assert main(["run", config]) == 0
    out = capsys.readouterr().out
    assert "stage jobs: 1" in out and "stage job " in out  # plan's graph, then the service
    state = ExperimentState.load("ahead")
    client = MlflowClient(state.tracking_uri)
    (job,) = json.loads(
        Path(client.download_artifacts(state.parent_run_id, STAGE_JOBS_ARTIFACT)).read_text()
    ).values()
    assert job["status"] == "done" and job["attempts"] == 1 and job["workers"] >= 1
    first, second = job["records"]  # one init key per rank, on one base and one calibration
    assert [first[s]["status"] for s in ("quantize", "calibrate", "initialize")] == ["computed"] * 3
    assert [second[s]["status"] for s in ("quantize", "calibrate", "initialize")] == [
        "reused",
        "reused",
        "computed",
    ]
    assert first["calibrate"]["bytes"] > 0
    ready = job["started"] + job["seconds"]
    runs = _children(state)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert {run.data.tags[stage_tag(s)] for s in ("quantize", "calibrate", "initialize")} == {
            "precomputed"
        }
        assert run.info.start_time / 1000 >= ready - 1.0  # its run began once its stages were ready
        assert run.data.metrics[STAGE_WAIT_SECONDS] >= 0
    # planned = computed: the runs' keys partition the trials as the graph did, with the job's digests
    for stage in ("calibrate", "initialize"):
        used = {}
        for run in runs:
            used.setdefault(run.data.params[stage_param(stage)], set()).add(
                run.data.tags["trial_name"].split("_")[0]
            )
        planned = [sorted({n.split("_")[0] for n in names}) for names in graph.entries[stage].values()]
        assert sorted(sorted(v) for v in used.values()) == sorted(planned)
    assert {r.data.params[stage_param("calibrate")] for r in runs} == {first["calibrate"]["digest"]}
    # the report's cached-stages table: calibrate computed in no trial, precomputed for all four
    assert re.search(r"\| calibrate\s+\|\s+0\s+\|\s+4\s+\|\s+0\s+\|", out), out[-3000:]


def _live_placement_groups() -> list[dict]:
    """Placement groups Ray still holds (or is placing), from the GCS: Tune's per-trial ones and Train's worker groups."""
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def _set_tune_status(experiment_dir: str, trial_id: str, status: str) -> None:
    """Rewrite one trial's status in Tune's saved experiment state, as if the sweep had stopped before Tune saved it."""
    (path,) = Path(experiment_dir).glob("experiment_state-*.json")
    state = json.loads(path.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == trial_id:
            trial["status"] = status
            entry[0] = json.dumps(trial)
    path.write_text(json.dumps(state))


def test_asha_sweep_stops_a_trial_cleanly_and_resume_does_not_train_it_again(
    tmp_path, monkeypatch, capsys, local_ray
):
    """Issue 18, one trial at a time, the better learning rate first: ASHA stops the second at its grace period,
    step 4 (at step 2, one step after the warmup step, the adapters have barely moved and the trials tie)."""
    monkeypatch.chdir(tmp_path)
    base = {**MICRO_BASE, "train": {**MICRO_BASE["train"], "max_steps": 8, "eval_every": 2}}
    asha = {"max_t": 8, "grace_period": 4, "reduction_factor": 2}
    config = _sweep(tmp_path, "asha", {"train.learning_rate": {"grid": [3e-3, 1e-6]}}, base=base,
                    search={"max_concurrent_trials": 1, "asha": asha})  # fmt: skip
    assert main(["run", config]) == 0  # the sweep finishes
    out = capsys.readouterr().out
    state = ExperimentState.load("asha")
    client = MlflowClient(state.tracking_uri)
    runs = {r.data.tags["tune_trial_id"]: r for r in _children(state)}
    (best,) = (r for r in runs.values() if r.info.status == "FINISHED")
    assert best.data.params["train.learning_rate"] == "0.003"
    ((trial_id, stopped),) = ((t, r) for t, r in runs.items() if STOPPED_EARLY_TAG in r.data.tags)
    assert f"stopped  {trial_id}" in out and "Stopped early by the scheduler" in out  # progress line, report
    assert stopped.info.status == "KILLED" and stopped.data.metrics[STOPPED_AT_STEP] == 4  # not FAILED
    kept = client.get_metric_history(stopped.info.run_id, VAL_PPL)  # its partial metrics
    assert 4 in {m.step for m in kept}

    # The stopped trial's Train run gave its workers' placement group back: with no trial left running,
    # Ray holds no placement group, and all of the cluster's CPUs are free again.
    assert _live_placement_groups() == []
    total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + 30
    while ray.available_resources().get("CPU") != total and time.monotonic() < deadline:
        time.sleep(0.5)  # the driver's view of free resources follows the node's next report
    assert ray.available_resources().get("CPU") == total

    assert main(["status"]) == 0
    status = _status_row(capsys.readouterr().out, "asha")
    counts = ("trials", "finished", "running", "failed", "stopped early", "interrupted", "time left (est.)")
    assert [status[c] for c in counts] == ["2", "1", "0", "0", "1", "0", "0 h"]

    # Interrupted while the trial was being stopped: Tune's saved state still has it running.
    _set_tune_status(state.path, trial_id, "RUNNING")
    steps = [m.step for m in client.get_metric_history(stopped.info.run_id, TRAIN_LOSS)]
    assert main(["resume", "asha"]) == 0
    (restarted,) = _started_lines(capsys.readouterr().out)
    assert trial_id in restarted  # Tune starts it again, and it returns without training:
    again = client.get_run(stopped.info.run_id)
    assert (again.info.status, again.info.end_time) == ("KILLED", stopped.info.end_time)
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, TRAIN_LOSS)] == steps
    assert _live_placement_groups() == []


def _start_driver(
    cli: list[str], command: list[str], tmp_path: Path, env: dict, log: str
) -> subprocess.Popen:
    """The CLI in its own process group: killing the group takes the driver and its embedded Ray down
    together, like a crash."""
    out = (tmp_path / log).open("w")
    return subprocess.Popen([*cli, *command], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _kill_when(driver: subprocess.Popen, ready, log: Path, seconds: float) -> None:
    """Poll ``ready()`` until it holds, then SIGKILL the driver's process group (also on failure)."""
    try:
        deadline = time.monotonic() + seconds
        while not ready() and time.monotonic() < deadline:
            assert driver.poll() is None, (
                "the sweep ended before it could be killed:\n" + log.read_text()[-3000:]
            )
            time.sleep(0.2)
        assert ready(), log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()


def test_resume_after_the_driver_is_killed_mid_stage_job_and_again_after_a_trial(tmp_path):
    """The driver (and its embedded Ray) killed twice. First while the sweep's stage job runs (issue 28): no
    half-written entry is ever complete, and `resume` runs the job again. Then after one trial finished: the
    next `resume` starts only the unfinished trial, its stage job sees to that trial's init key only, the
    finished run is untouched, and every stage was computed once."""
    base = {**MICRO_BASE, "init": {"method": "quailora"}}
    config = _sweep(tmp_path, "killed", {"lora.rank": {"grid": [4, 8]}}, base=base,
                    search={"max_concurrent_trials": 1})  # fmt: skip
    # Tune saves its experiment state at every step, so a trial it has seen finish is recorded before the kill.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    experiment, cache = tmp_path / "runs" / "killed", tmp_path / "runs" / "cache"

    def stage_job_started() -> bool:
        return bool(list(experiment.glob("stages/stages-*")) and list(experiment.glob("experiment_state-*")))

    driver = _start_driver(cli, ["run", config], tmp_path, env, "run.log")
    _kill_when(driver, stage_job_started, tmp_path / "run.log", 300)
    assert "stage jobs: 1" in (tmp_path / "run.log").read_text()
    state = ExperimentState.load(str(experiment))
    assert not [r for r in _children(state) if r.info.status == "FINISHED"]  # killed before any trial ended
    for entry in (p for p in cache.glob("*/*") if not p.name.startswith(".")):
        assert (entry / "meta.json").is_file(), entry  # under its final name only once complete

    finished: list = []

    def one_finished() -> bool:
        if "] finished " not in (tmp_path / "resume.log").read_text():  # Tune has not seen one finish yet
            return False
        finished[:] = [r for r in _children(state) if r.info.status == "FINISHED"]
        return bool(finished)

    driver = _start_driver(cli, ["resume", "killed"], tmp_path, env, "resume.log")
    _kill_when(driver, one_finished, tmp_path / "resume.log", 400)
    assert "stage jobs: 1" in (tmp_path / "resume.log").read_text()  # the job ran again after the first kill
    (first,) = finished

    resumed = subprocess.run(
        [*cli, "resume", "killed"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    client = MlflowClient(state.tracking_uri)
    runs = _children(state)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # Only the unfinished trial was started again; the finished one kept its run, untouched.
    (started,) = _started_lines(resumed.stdout)
    assert first.info.run_name not in started, started
    again = next(r for r in runs if r.info.run_id == first.info.run_id)
    assert again.info.end_time == first.info.end_time
    # The restarted trial found every stage computed before the last kill, once for the whole sweep.
    restarted = next(r for r in runs if r.info.run_id != first.info.run_id)
    assert {restarted.data.tags[stage_tag(s)] for s in ("quantize", "calibrate", "initialize")} == {"reused"}
    assert {r.data.tags[stage_tag("calibrate")] for r in runs} <= {"precomputed", "reused"}
    assert len(list(cache.glob("calibrate/*/meta.json"))) == 1 and not list(cache.glob("*/.tmp-*"))
    # The last resume's stage job saw to the unfinished trial's init key only.
    (job,) = json.loads(
        Path(client.download_artifacts(state.parent_run_id, STAGE_JOBS_ARTIFACT)).read_text()
    ).values()
    (record,) = job["records"]
    assert record["initialize"]["digest"] == restarted.data.params[stage_param("initialize")], job
    assert client.get_run(state.parent_run_id).info.status == "FINISHED"


def test_ctrl_c_interrupts_the_sweep_and_resume_finishes_it_from_its_checkpoint(tmp_path):
    """Ctrl-C (SIGINT to the driver): Tune saves its state and returns; the sweep and the trial run it left
    running end KILLED (`status`: interrupted, not running), the command exits 130, and resume finishes the
    trial in the same MLflow run from its last checkpoint."""
    train = {**MICRO_BASE["train"], "max_steps": 200, "checkpoint_every": 25}  # ~15 steps a second
    config = _sweep(tmp_path, "paused", {"seed": {"grid": [0]}}, base={**MICRO_BASE, "train": train})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen([*cli, "run", config], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        deadline, step, path = time.monotonic() + 400, 0, tmp_path / "runs" / "paused"
        while step < 30 and time.monotonic() < deadline and driver.poll() is None:  # past one checkpoint
            time.sleep(1)
            if not (path / STATE_FILE).is_file():
                continue
            state = ExperimentState.load(str(path))
            runs = _children(state) if state.parent_run_id else []
            if runs:
                history = MlflowClient(state.tracking_uri).get_metric_history(runs[0].info.run_id, TRAIN_LOSS)
                step = max((m.step for m in history), default=0)
        assert driver.poll() is None and step >= 30, (tmp_path / "run.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 130, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert (
        "interrupted with 0 of 1 trials ended; `quailora resume paused` continues it"
        in (tmp_path / "run.log").read_text()
    )
    client = MlflowClient(state.tracking_uri)
    (run,) = _children(state)
    assert client.get_run(state.parent_run_id).info.status == "KILLED" and run.info.status == "KILLED"
    status = subprocess.run(
        [*cli, "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert _status_row(status.stdout, "paused")["sweep"] == "INTERRUPTED", status.stdout

    resumed = subprocess.run(
        [*cli, "resume", "paused"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    (again,) = _children(state)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert client.get_run(state.parent_run_id).info.status == "FINISHED"
    assert again.data.metrics["resumed_from_step"] >= 25  # from a checkpoint, not from step 0
