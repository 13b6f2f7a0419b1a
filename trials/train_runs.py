"""The Ray Train runs this process is fitting, so that a process being torn down can shut them down cleanly.

Why: Ray Tune stops a trial (its scheduler, ASHA, prunes it; or the sweep ends) by ending the Tune actor that
called ``TorchTrainer.fit()``. Ray Train V2's controller is an actor owned by that actor, so it dies with it
without running its shutdown, and the placement group of its workers outlives it: Ray removes a placement
group only once both the actor that created it and that actor's job have exited, and the job is the sweep's
driver. (Ray Train's own PlacementGroupCleaner would remove it, but it polls the controller through the State
API, which needs the Ray dashboard that ``ray[tune,train]`` does not install, and which it cannot find when
several Ray instances run on one host.) So the Tune actor, before it exits, aborts its Train runs through
the controller's ``abort``, the call TorchTrainer's own Ctrl-C handler makes: workers stopped, placement
group removed, controller exited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import ray
from ray.exceptions import RayActorError, RayError
from ray.train import UserCallback
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

# The controller's abort waits up to 5 s for the workers' shutdown hooks, then kills them and removes the group.
ABORT_TIMEOUT_S = 60.0


class _ControllerHandoff(UserCallback):
    """Runs on the Train controller: at the run's first report, hands the controller's handle to the process
    that started the run. Listed before Tune's report callback, so before any scheduler decision."""

    def __init__(self, slot: Queue) -> None:
        self._slot, self._sent = slot, False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self._sent:
            return
        self._sent = True
        try:
            self._slot.put(ray.get_runtime_context().current_actor)
        except RayError:  # training goes on; only a clean abort of this run is lost
            logger.exception("could not hand the Train controller to the process that started the run")


class TrainRun:
    """One Train run being fitted here: pass ``callback`` to its RunConfig; ``aborted`` tells the fitting
    thread that its fit() ended because this process aborted it, not because training failed."""

    def __init__(self, on_abort: Callable[[], None]) -> None:
        self.aborted = False
        self._on_abort = on_abort
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._slot = Queue(maxsize=1, actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.callback = _ControllerHandoff(self._slot)

    def abort(self, while_waiting: Callable[[], None]) -> None:
        self.aborted = True
        try:
            controller = self._slot.get_nowait()
        except Empty:  # no report yet: the controller dies with this process, its workers' placement
            # group lasts as long as the job (the sweep)
            logger.warning("Train run stopped before its first report; its placement group outlives it")
        else:
            done = controller.abort.remote()
            deadline = time.monotonic() + ABORT_TIMEOUT_S
            while not ray.wait([done], timeout=0.5)[0]:
                if time.monotonic() > deadline:
                    logger.warning("Train controller did not abort in %.0f s; killing it", ABORT_TIMEOUT_S)
                    ray.kill(controller)
                    break
                while_waiting()
            else:
                with suppress(RayActorError):  # abort() ends by exiting the controller
                    ray.get(done)
        self._on_abort()

    def close(self) -> None:
        self._slot.shutdown(force=True)


_RUNS: list[TrainRun] = []
_LOCK = threading.Lock()


@contextmanager
def train_run(on_abort: Callable[[], None]) -> Iterator[TrainRun]:
    """Track a Train run for the duration of its fit(); ``on_abort`` runs after this process aborts it."""
    run = TrainRun(on_abort)
    with _LOCK:
        _RUNS.append(run)
    try:
        yield run
    finally:
        with _LOCK:
            _RUNS.remove(run)
        run.close()


def abort_train_runs(while_waiting: Callable[[], None] = lambda: None) -> int:
    """Abort every Train run this process is fitting (from another thread than the fitting one); returns how many.

    ``while_waiting`` is called while a controller is still aborting: the caller's chance to keep the run's
    report callbacks from blocking the controller (see the Tune driver's)."""
    with _LOCK:
        runs = list(_RUNS)
    for run in runs:
        try:
            run.abort(while_waiting)
        except Exception:  # the process is being torn down either way; one failure must not keep the others
            logger.exception("aborting a Train run failed")
    return len(runs)
