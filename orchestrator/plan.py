"""`quailora plan`: the trial matrix with each trial's resources and memory estimate, and the fit check."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from tabulate import tabulate

from orchestrator.expand import TrialMatrix
from orchestrator.memory import GIB, MemoryEstimate, estimate
from orchestrator.model_shapes import ModelShape, resolve_shape
from orchestrator.stage_graph import describe_stage_graph, plan_stage_graph
from quailora.errors import QuailoraInputError
from trials.config import TrialConfig, check_resources

MIB = 1024**2


@dataclass
class PlannedTrial:
    name: str
    resources: dict
    memory: MemoryEstimate
    fits: bool


@cache
def _shape(model_path: str) -> ModelShape:
    return resolve_shape(model_path)


def check_devices(kind: str, name: str, trial: TrialConfig) -> None:
    """``devices.kind`` says what the trials' workers run on, and so what ``devices.memory_gb`` bounds and
    how the estimate costs ``train.precision: auto`` (bf16 on GPUs, fp32 on CPUs): a trial on the other
    kind of device would be planned against the wrong memory."""
    check_resources(trial.resources)
    if (kind == "gpu") != trial.resources.use_gpu:
        raise QuailoraInputError(
            f"trial {name!r}: resources.use_gpu={trial.resources.use_gpu} but devices.kind={kind!r}; "
            f"set devices.kind: {'gpu' if trial.resources.use_gpu else 'cpu'} or change resources.use_gpu"
        )


def plan_trials(matrix: TrialMatrix) -> list[PlannedTrial]:
    """Each grid point at the worst corner of its sampled fields, since Tune may draw any value in between."""
    limit = matrix.sweep.devices.memory_gb * GIB
    planned = []
    for point in matrix.points:
        corners = list(matrix.corner_trials(point))
        for trial in corners:
            check_devices(matrix.sweep.devices.kind, point.name, trial)
        mem, trial = max(
            ((estimate(t, _shape(t.model.path)), t) for t in corners),
            key=lambda pair: pair[0].peak,
        )
        planned.append(PlannedTrial(point.name, trial.resources.model_dump(), mem, mem.peak <= limit))
    return planned


def plan_rows(planned: list[PlannedTrial]) -> list[dict]:
    return [
        {
            "trial": p.name,
            "workers": p.resources["num_workers"],
            "cpu/worker": p.resources["cpus_per_worker"],
            "gpu/worker": p.resources["gpus_per_worker"],
            "quant weights MiB": p.memory.quantized_weights / MIB,
            "other weights MiB": p.memory.other_weights / MIB,
            "adapters+optim MiB": p.memory.adapters / MIB,
            "activations MiB": p.memory.activations / MIB,
            "calibration MiB": p.memory.calibration / MIB,
            "peak GiB": p.memory.peak / GIB,
            "fits": "yes" if p.fits else "NO",
        }
        for p in planned
    ]


def describe(matrix: TrialMatrix, planned: list[PlannedTrial]) -> str:
    sweep = matrix.sweep
    lines = [
        f"sweep {sweep.name!r}: {matrix.num_trials} trials ({len(matrix.points)} grid points x "
        f"{sweep.search.num_samples} samples, search={sweep.search.algorithm}), {len(matrix.dropped)} combinations dropped by drop_if",
        f"devices: {sweep.devices.kind}, {sweep.devices.memory_gb:g} GiB per worker; storage {sweep.resolved_storage_path()}/{sweep.name}; "
        f"tracking {sweep.resolved_tracking_uri()}",
    ]
    if matrix.sampled:
        lines.append(
            "sampled per trial (memory at the worst corner): "
            + ", ".join(f"{p}={d.model_dump()}" for p, d in matrix.sampled.items())
        )
    if sweep.share_stages and sweep.stage_jobs:
        lines.append(describe_stage_graph(plan_stage_graph(matrix)))
    # tabulate (what pandas' to_markdown calls) directly: plan stays free of pandas' import time
    lines.append(tabulate(plan_rows(planned), headers="keys", tablefmt="pipe", floatfmt=".2f"))
    return "\n".join(lines)


def refuse_misfits(matrix: TrialMatrix, planned: list[PlannedTrial]) -> None:
    bad = [p for p in planned if not p.fits]
    if bad:
        worst = max(bad, key=lambda p: p.memory.peak)
        raise QuailoraInputError(
            f"{len(bad)} trial(s) cannot fit devices.memory_gb={matrix.sweep.devices.memory_gb:g}: "
            f"e.g. trial {worst.name!r} needs {worst.memory.peak / GIB:.2f} GiB per worker"
        )
