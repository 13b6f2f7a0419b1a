"""The sweep's stage graph (orchestrator/stage_graph.py) and its service (orchestrator/stage_service.py),
in-process: which trials share a stage job, which take the on-demand path, and a failing job."""

from __future__ import annotations

import threading

import pytest

from orchestrator.expand import expand
from orchestrator.stage_graph import plan_stage_graph
from orchestrator.stage_service import StageJobFailedError, StageService, job_workers, precomputed_digests
from orchestrator.sweep_config import SweepConfig

BASE = {"model": {"path": "reference:llama-micro"}, "resources": {"num_workers": 1}}


def _graph(space: dict, **search):
    sweep = SweepConfig.model_validate({"name": "g", "base": BASE, "space": space, "search": search})
    return plan_stage_graph(expand(sweep))


def test_trials_sharing_a_base_and_calibration_share_one_job():
    graph = _graph({"init.method": {"grid": ["gaussian", "quailora"]}, "lora.rank": {"grid": [4, 8]},
                    "train.learning_rate": {"grid": [1e-3, 3e-3]}})  # fmt: skip
    assert graph.counts() == {"quantize": (1, 1), "calibrate": (1, 1), "initialize": (4, 4)}
    calibrated = [job for job in graph.jobs if job.calibrated]
    assert len(graph.jobs) == 2 and len(calibrated) == 1
    for job in graph.jobs:  # two init keys (ranks), each run once, ahead of four trials (x2 learning rates)
        assert len(job.configs) == 2 and len(job.points) == 4
        assert sorted(c.lora.rank for c in job.configs) == [4, 8]
    assert set(graph.job_of) == {p for job in graph.jobs for p in job.points} and not graph.on_demand


def test_a_resumed_sweep_keeps_only_the_jobs_and_init_keys_of_points_left_to_run():
    graph = _graph({"init.method": {"grid": ["gaussian", "quailora"]}, "lora.rank": {"grid": [4, 8]},
                    "train.learning_rate": {"grid": [1e-3, 3e-3]}})  # fmt: skip
    (plain,) = [job for job in graph.jobs if not job.calibrated]
    (calibrated,) = [job for job in graph.jobs if job.calibrated]
    rank4 = [p for p in calibrated.points if "rank=4" in p]
    assert len(rank4) == 2

    resumed = graph.without(set(plain.points) | {rank4[0]})
    (job,) = resumed.jobs  # every gaussian trial ended: its job is not run again
    assert job.id == calibrated.id and set(job.points) == set(calibrated.points) - {rank4[0]}
    assert sorted(c.lora.rank for c in job.configs) == [4, 8]  # rank 4 at the other rate still needs its key
    assert set(resumed.job_of) == set(job.points)

    (job,) = graph.without(set(plain.points) | set(rank4)).jobs
    assert [c.lora.rank for c in job.configs] == [8] and not [p for p in job.points if "rank=4" in p]
    assert graph.without(set(graph.job_of)).jobs == [] and graph.without(set()).jobs == graph.jobs


def test_a_trial_with_its_own_stages_or_a_sampled_stage_field_is_on_demand():
    alone = _graph({"init.method": {"grid": ["gaussian", "quailora"]}})
    assert not alone.jobs and set(alone.on_demand.values()) == {"its stages are its own"}
    sampled = _graph({"lora.rank": {"choice": [4, 8]}}, algorithm="random", num_samples=3)
    assert not sampled.jobs and "lora.rank" in next(iter(sampled.on_demand.values()))
    # A learning rate sampled per trial changes no stage: the samples of one point share its job.
    repeated = _graph(
        {"train.learning_rate": {"loguniform": [1e-4, 1e-3]}}, algorithm="random", num_samples=3
    )
    assert len(repeated.jobs) == 1 and not repeated.on_demand
    optuna = _graph({"lora.rank": {"grid": [4, 8]}}, algorithm="optuna", num_samples=2)
    assert not optuna.jobs and "Optuna" in next(iter(optuna.on_demand.values()))


def test_a_failing_job_is_retried_then_fails_its_trials_with_its_error():
    calls = []

    def failing(workers: int) -> list[dict]:
        calls.append(1)
        raise OSError("disk full")

    release = threading.Event()

    def slow(workers: int) -> list[dict]:
        release.wait()
        return [{"quantize": {"status": "computed", "digest": "q1", "seconds": 1.0, "bytes": 9}}]

    service = StageService({"bad": failing, "good": slow}, concurrency=2, workers=3)
    with pytest.raises(
        StageJobFailedError, match="stage job bad failed after 2 attempts: OSError: disk full"
    ):
        service.wait("bad")
    assert len(calls) == 2
    assert "good" not in service.records()  # its trials are still waiting
    release.set()
    record = service.wait("good")
    assert record["status"] == "done" and record["workers"] == 3 and precomputed_digests(record) == ["q1"]


class NoFreeSlot(RuntimeError):
    pass


def test_a_job_without_free_slots_waits_narrower_and_fails_only_when_no_node_could_hold_a_worker():
    """The sweep's running trials hold every worker slot: the job asks again with half the workers each
    time (down to one), never counting that as a failure, until a slot frees; its trials wait meanwhile."""
    asked, frees_at = [], 4

    def busy(workers: int) -> list[dict]:
        asked.append(workers)
        if len(asked) < frees_at:
            raise NoFreeSlot(workers)
        return [{"quantize": {"status": "computed", "digest": "q1", "seconds": 1.0, "bytes": 9}}]

    service = StageService(
        {"job": busy}, concurrency=1, workers=8, can_wait=lambda e: isinstance(e, NoFreeSlot)
    )
    record = service.wait("job")
    assert asked == [8, 4, 2, 1] and record["status"] == "done"
    assert (record["attempts"], record["waits"], record["workers"]) == (1, 3, 1)

    # A slot that can never free (no node holds a worker any more) is the job's error, retried once.
    def gone(workers: int) -> list[dict]:
        raise NoFreeSlot(99)

    service = StageService({"job": gone}, concurrency=1, workers=1, can_wait=lambda e: False)
    with pytest.raises(StageJobFailedError, match="after 2 attempts: NoFreeSlot: 99"):
        service.wait("job")


def test_job_width_uses_every_free_slot_up_to_what_a_job_can_use():
    assert job_workers({"CPU": 1}, {"CPU": 8}, jobs=2, cap=100) == (4, 2)
    assert job_workers({"CPU": 1, "GPU": 1}, {"CPU": 16, "GPU": 8}, jobs=3, cap=100) == (2, 3)
    assert job_workers({"CPU": 1}, {"CPU": 8}, jobs=1, cap=3) == (3, 1)  # 3 layers: more workers idle
    assert job_workers({"CPU": 2}, {"CPU": 1}, jobs=2, cap=100) == (1, 1)  # at least one, queued by Ray
