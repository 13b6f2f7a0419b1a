"""Runs a sweep's stage jobs (orchestrator/stage_graph.py) while Tune starts its trials, and tells each
trial's driver when its stages are ready.

A Ray actor on the driver's node, named after the sweep, so trial drivers on any node find it. It runs the
jobs on its own threads, each one Ray Train run (trials.run.run_stage_job) holding only workers; a trial
driver waits for its job in ``wait`` (holding only the driver's own small reservation, no worker), then
runs its trial, whose stages are then all in the cache. A job that fails is retried once; then every
trial that needs it fails with the job's error instead of waiting. A job whose workers found no free slot
(the sweep's running trials hold them) is not failing: it asks again, each time for half as many workers
(any width computes the same entries), for as long as a node could hold one worker. The actor, its threads
and their Train runs end with the sweep's driver (Ctrl-C included); the cache never holds a half-written
entry.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from quailora.errors import QuailoraInputError

RETRIES = 1


class StageJobFailedError(RuntimeError):
    """The stage job a trial needs failed (after its retry); the message is the job's error."""


class StageService:
    """Plain class (tests drive it in-process); ``start`` makes it the sweep's actor. A job is called with
    its number of workers. ``can_wait(error)``: the job found no free worker slot and one may free up
    (the remote service: Ray Train's worker group start timed out and a node could hold a worker)."""

    def __init__(
        self,
        jobs: dict[str, Callable[[int], list[dict]]],
        concurrency: int,
        workers: int = 1,
        can_wait: Callable[[BaseException], bool] = lambda error: False,
    ) -> None:
        self._workers = workers
        self._can_wait = can_wait
        self._records: dict[str, dict[str, Any]] = {}
        self._done = {job_id: threading.Event() for job_id in jobs}
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="stage-job")
        for job_id, job in jobs.items():
            self._pool.submit(self._run, job_id, job)

    def _run(self, job_id: str, job: Callable[[int], list[dict]]) -> None:
        began, errors, workers, waits = time.time(), [], self._workers, 0
        record: dict[str, Any] = {}
        while not record:
            try:
                records = job(workers)
            except Exception as err:  # noqa: BLE001 - any failure is the job's error, reported to its trials
                if self._can_wait(err):
                    waits, workers = waits + 1, max(1, workers // 2)
                    print(f"stage job {job_id}: no free worker slot yet; asking for {workers}", flush=True)
                    continue
                errors.append(f"{type(err).__name__}: {err}")
                traceback.print_exc()
                if len(errors) > RETRIES:
                    record = {"status": "failed", "error": errors[-1]}
                continue
            record = {"status": "done", "records": records}
        attempts = len(errors) + (record["status"] == "done")
        self._records[job_id] = {**record, "attempts": attempts, "waits": waits, "workers": workers,
                                 "started": began, "seconds": time.time() - began}  # fmt: skip
        self._done[job_id].set()

    def wait(self, job_id: str) -> dict[str, Any]:
        """The job's record once it ended; raises StageJobFailedError when it failed."""
        if job_id not in self._done:
            raise QuailoraInputError(f"no stage job {job_id!r} in this sweep")
        self._done[job_id].wait()
        record = self._records[job_id]
        if record["status"] == "failed":
            raise StageJobFailedError(
                f"stage job {job_id} failed after {record['attempts']} attempts: {record['error']}"
            )
        return record

    def records(self) -> dict[str, dict[str, Any]]:
        return dict(self._records)


def actor_name(sweep: str) -> str:
    return f"quailora-stages-{sweep}"


def precomputed_digests(record: dict[str, Any]) -> list[str]:
    """The cache digests a job computed (what its trials then find): their stages are `precomputed`."""
    return sorted(
        {s["digest"] for trial in record["records"] for s in trial.values() if s["status"] == "computed"}
    )


def _start_timed_out(error: BaseException) -> bool:
    """Ray Train gave up starting the job's worker group: its placement group found no free slot."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(error, ControllerError) and isinstance(
        error.controller_failure, WorkerGroupStartupTimeoutError
    )


def _a_node_holds(bundle: dict[str, float]) -> bool:
    from orchestrator.tuning import alive_nodes, fits

    return any(fits(bundle, node) for node in alive_nodes())


class _RemoteStageService(StageService):
    """The actor: builds each job's call from plain data (configs as dicts) inside the actor's process."""

    def __init__(self, jobs: dict[str, list[dict]], concurrency: int, num_workers: int, **where: Any) -> None:
        from trials.config import TrialConfig
        from trials.run import run_stage_job, scaling_config

        configs = {job_id: [TrialConfig.model_validate(c) for c in dicts] for job_id, dicts in jobs.items()}
        calls = {
            job_id: lambda workers, job_id=job_id: run_stage_job(
                f"stages-{job_id}", configs[job_id], num_workers=workers, **where
            )
            for job_id in jobs
        }
        bundle = scaling_config(next(iter(configs.values()))[0]).resources_per_worker

        def can_wait(error: BaseException) -> bool:
            return _start_timed_out(error) and _a_node_holds(bundle)

        super().__init__(calls, concurrency, num_workers, can_wait)


def job_workers(bundle: dict[str, float], free: dict[str, float], jobs: int, cap: int) -> tuple[int, int]:
    """(workers per job, jobs at once): every free worker slot busy, each job as wide as the slots allow,
    at most ``cap`` workers (beyond the calibration sequences or decoder layers a worker has nothing to do)."""
    slots = min(int(free.get(key, 0.0) // amount) for key, amount in bundle.items() if amount > 0)
    slots = max(1, slots)
    at_once = max(1, min(jobs, slots))
    return max(1, min(cap, slots // at_once)), at_once


def _useful_workers(job) -> int:
    """Beyond the calibration's sequences (data-parallel) or the model's decoder layers (init, layer-sharded)
    a worker has nothing to do."""
    from orchestrator.model_shapes import resolve_shape

    config = job.configs[0]
    layers = resolve_shape(config.model.path).layers
    return min(layers, config.calibration.num_sequences) if job.calibrated else layers


def start(graph, sweep, state, trial_concurrency: int, driver: dict[str, float]):
    """The sweep's stage service actor, running its jobs; None when the graph has none."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trials.run import scaling_config

    if not graph.jobs:
        return None
    first = graph.jobs[0].configs[0]
    bundle = scaling_config(first).resources_per_worker
    free = dict(ray.cluster_resources())
    for key, amount in driver.items():  # what the waiting trial drivers hold
        free[key] = free.get(key, 0.0) - trial_concurrency * amount
    cap = max(_useful_workers(job) for job in graph.jobs)
    workers, at_once = job_workers(bundle, free, len(graph.jobs), cap)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(num_cpus=0, max_concurrency=1000)(_RemoteStageService)
    service = actor.options(name=actor_name(sweep.name), scheduling_strategy=here).remote(
        {job.id: [c.model_dump(mode="json") for c in job.configs] for job in graph.jobs},
        at_once,
        storage_path=f"{state.storage_path.rstrip('/')}/{sweep.name}/stages",
        cache_path=sweep.resolved_cache_path(),
        num_workers=workers,
    )
    ray.get(service.records.remote())  # running (its name registered) before any trial looks for it
    print(f"stage jobs: {len(graph.jobs)}, {at_once} at a time, {workers} worker(s) each", flush=True)
    return service
