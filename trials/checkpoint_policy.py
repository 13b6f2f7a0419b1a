"""When a trial checkpoints and how many checkpoints it keeps: read by the trial (trials/checkpointing.py) and by
`quailora plan`'s storage figures (orchestrator/footprint.py), without the training libraries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trials.config import TrainSpec

CHECKPOINTS_KEPT = 1  # Ray Train deletes the previous checkpoint only once the next one is persisted

# Without an explicit interval: a model below LARGE_MODEL_PARAMETERS checkpoints every SMALL_MODEL_STEPS steps
# (a checkpoint of its adapter is megabytes), a larger one every LARGE_MODEL_MINUTES of wall time (gigabytes
# at 30B and rank 64; steps of seconds each would write one every few minutes).
LARGE_MODEL_PARAMETERS = 1_000_000_000
SMALL_MODEL_STEPS = 25
LARGE_MODEL_MINUTES = 30.0


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a mid-run checkpoint is due: every ``steps`` steps and/or every ``minutes`` of wall time (0 / None:
    never by that measure); the end of training always checkpoints."""

    steps: int = 0
    minutes: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def checkpoint_policy(train: TrainSpec, num_parameters: int) -> CheckpointPolicy:
    """The trial's interval: what ``train.checkpoint_every`` / ``train.checkpoint_minutes`` say, else one chosen
    by model size (see LARGE_MODEL_PARAMETERS)."""
    if train.checkpoint_every is not None or train.checkpoint_minutes is not None:
        return CheckpointPolicy(train.checkpoint_every or 0, train.checkpoint_minutes)
    if num_parameters >= LARGE_MODEL_PARAMETERS:
        return CheckpointPolicy(0, LARGE_MODEL_MINUTES)
    return CheckpointPolicy(SMALL_MODEL_STEPS, None)
