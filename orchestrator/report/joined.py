"""Follow-up sweeps in one report (`quailora report BASE --with FOLLOW_UP`): e.g. the next learning rate for
arms whose choice landed on the edge of the first sweep's rates. The report compares their trials as one
sweep's, so the sweeps may differ only in fields one of them sweeps."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.comparison import under
from orchestrator.expand import expand
from orchestrator.sweep_config import SweepConfig
from quailora.errors import QuailoraInputError
from trials.tracking import flat_params

# Where and how fast a trial runs, not what it computes.
PLACEMENT_FIELDS = ("name", "tags", "resources.cpus_per_worker", "resources.gpus_per_worker",
                    "resources.start_timeout_s")  # fmt: skip


def _fixed(sweep: SweepConfig) -> dict[str, str]:
    """Every field of the sweep's trials, as its first grid point sets them (swept fields included)."""
    return flat_params(expand(sweep).points[0].trial_config())


def joined_swept(primary: SweepConfig, follow_ups: Sequence[SweepConfig]) -> list[str]:
    """The fields any of the sweeps sweeps (the report's swept fields: never averaged over). Raises
    QuailoraInputError naming a field the sweeps hold at different values without sweeping it."""
    swept = list(dict.fromkeys(path for sweep in (primary, *follow_ups) for path in sweep.space))
    mine = _fixed(primary)
    for other in follow_ups:
        theirs = _fixed(other)
        for field in sorted(set(mine) | set(theirs)):
            if under(field, (*swept, *PLACEMENT_FIELDS)) or mine.get(field) == theirs.get(field):
                continue
            raise QuailoraInputError(
                f"--with {other.name}: {field} is {theirs.get(field)} there and {mine.get(field)} in "
                f"{primary.name}; joined sweeps may differ only in the fields one of them sweeps"
            )
    return swept
