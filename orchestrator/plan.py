"""`quailora plan`: the sweep's summary (stage computations, disk), the trial matrix with each trial's
resources and memory estimate (grouped by identical footprint, or one row per trial), and the fit check."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from tabulate import tabulate

from orchestrator.expand import TrialMatrix
from orchestrator.experts_plan import describe_experts
from orchestrator.footprint import describe_footprint, sweep_footprint
from orchestrator.memory import GIB, MemoryEstimate, estimate
from orchestrator.model_shapes import ModelShape, resolve_shape
from orchestrator.stage_graph import describe_stage_graph, plan_stage_graph
from quailora.errors import QuailoraInputError
from quailora.supported_architectures import UNTESTED, support
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


def _row(p: PlannedTrial) -> dict:
    return {
        "workers": p.resources["num_workers"],
        "cpu/worker": p.resources["cpus_per_worker"],
        "gpu/worker": p.resources["gpus_per_worker"],
        "quant weights MiB": p.memory.quantized_weights / MIB,
        "other weights MiB": p.memory.other_weights / MIB,
        "adapters+optim MiB": p.memory.adapters / MIB,
        "activations MiB": p.memory.activations / MIB,
        "calibration MiB": p.memory.calibration / MIB,
        "init MiB": p.memory.initialization / MIB,
        "damping MiB": p.memory.damping / MIB,
        "eval logits MiB": p.memory.eval_logits / MIB,
        "dequant MiB": p.memory.dequantized / MIB,
        "peak at": p.memory.peak_phase,
        "peak GiB": p.memory.peak / GIB,
        "fits": "yes" if p.fits else "NO",
    }


def plan_rows(planned: list[PlannedTrial]) -> list[dict]:
    """One row per grid point (`quailora plan --trials`)."""
    return [{"trial": p.name, **_row(p)} for p in planned]


def grouped_rows(planned: list[PlannedTrial]) -> list[dict]:
    """One row per distinct footprint (resources and memory estimate), in order of first appearance, with
    how many grid points have it and the first of them."""
    groups: dict[tuple, list[PlannedTrial]] = {}
    for p in planned:
        groups.setdefault((tuple(sorted(p.resources.items(), key=str)), p.memory), []).append(p)
    return [{"grid points": len(ps), "e.g.": ps[0].name, **_row(ps[0])} for ps in groups.values()]


def describe(matrix: TrialMatrix, planned: list[PlannedTrial], every_trial: bool = False) -> str:
    """The header, the summary (orchestrator.footprint), the stage graph, then the table: grouped by
    identical footprint, or with ``every_trial`` one row per grid point."""
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
    lines.append(describe_footprint(sweep_footprint(matrix, _shape), sweep.resolved_cache_path()))
    lines.extend(describe_experts(matrix, _shape))
    lines.extend(
        f"model {path}: type {_shape(path).model_type!r} is {UNTESTED} (`quailora architectures` lists the tested ones)"
        for path in sorted({p.trial_config().model.path for p in matrix.points})
        if support(_shape(path).model_type) == UNTESTED
    )
    if sweep.share_stages and sweep.stage_jobs:
        lines.append(describe_stage_graph(plan_stage_graph(matrix)))
    rows = plan_rows(planned) if every_trial else grouped_rows(planned)
    if not every_trial:
        lines.append(
            f"memory per worker: {len(rows)} distinct footprint(s) over {len(planned)} grid point(s) "
            "(quailora plan --trials: one row per grid point)"
        )
    # tabulate (what pandas' to_markdown calls) directly: plan stays free of pandas' import time
    lines.append(tabulate(rows, headers="keys", tablefmt="pipe", floatfmt=".2f"))
    return "\n".join(lines)


def refuse_misfits(matrix: TrialMatrix, planned: list[PlannedTrial]) -> None:
    bad = [p for p in planned if not p.fits]
    if bad:
        worst = max(bad, key=lambda p: p.memory.peak)
        raise QuailoraInputError(
            f"{len(bad)} trial(s) cannot fit devices.memory_gb={matrix.sweep.devices.memory_gb:g}: "
            f"e.g. trial {worst.name!r} needs {worst.memory.peak / GIB:.2f} GiB per worker"
        )
