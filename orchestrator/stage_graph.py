"""The sweep's stage graph: which trials share which quantize, calibrate and initialize entries, known from
the trial matrix before any trial runs (trials/stage_plan.py reads each stage's inputs off a config).

A stage job computes one quantized base and its calibration with every init key on them, ahead of the
trials (orchestrator/stage_service.py). Planned for grid points whose stage fields are fixed, and only
where an entry is shared by two trials or more (a trial's own stages are computed in it, as before):
Optuna proposes its trials one at a time and a sampled stage field (quant.*, init.*, lora.rank...) makes
each trial's stages its own, so those trials take the on-demand path (the cache, inside the trial).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from orchestrator.expand import TrialMatrix
from trials.config import TrialConfig
from trials.contract import STAGES
from trials.stage_plan import recipe_digest, stage_recipes

# Sampled fields under these paths change a trial's stage keys (trials/stage_plan.py reads no other field).
STAGE_FIELDS = ("model.", "quant.", "calibration.", "init.", "lora.", "seed", "train.precision",
                "resources.use_gpu")  # fmt: skip


SHOWN, SHOWN_JOBS = 3, 8  # grid point names `plan` prints per stage job, stage jobs it lists


@dataclass
class StageJob:
    """One base and calibration with its init keys: the configs to compute them from, and the trials served."""

    id: str
    configs: list[TrialConfig] = field(default_factory=list)  # the first trial of each init key
    points: list[str] = field(default_factory=list)  # grid points served (each may run several samples)
    calibrated: bool = False


@dataclass
class StageGraph:
    entries: dict[str, dict[str, list[str]]]  # stage -> entry (recipe digest) -> grid points sharing it
    jobs: list[StageJob]  # shared entries, computed ahead
    job_of: dict[str, str]  # grid point -> its stage job
    on_demand: dict[str, str]  # grid point -> why it takes the on-demand path

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per stage: distinct entries, and how many of them two or more grid points share."""
        return {s: (len(e), sum(len(p) > 1 for p in e.values())) for s, e in self.entries.items()}

    def without(self, ended: set[str]) -> StageGraph:
        """What a resumed sweep still needs: jobs for grid points with trials left to run, each with only
        those points' init keys. A job for ended trials would hold workers for nothing, and recompute
        whatever the cache lost since (`quailora cache prune`)."""
        jobs = []
        for job in self.jobs:
            left = [p for p in job.points if p not in ended]
            configs = [
                c for c in job.configs if not ended.issuperset(self.entries["initialize"][_init_digest(c)])
            ]
            if left:
                jobs.append(StageJob(job.id, configs, left, job.calibrated))
        job_of = {name: job.id for job in jobs for name in job.points}
        return StageGraph(self.entries, jobs, job_of, self.on_demand)


def _init_digest(config: TrialConfig) -> str:
    return recipe_digest(stage_recipes(config)["initialize"])


def _sampled_stage_fields(matrix: TrialMatrix) -> list[str]:
    return [path for path in matrix.sampled if path.startswith(STAGE_FIELDS)]


def plan_stage_graph(matrix: TrialMatrix) -> StageGraph:
    entries: dict[str, dict[str, list[str]]] = {stage: defaultdict(list) for stage in STAGES}
    groups: dict[str, StageJob] = {}
    init_seen: set[str] = set()
    on_demand: dict[str, str] = {}
    sampled = _sampled_stage_fields(matrix)
    for point in matrix.points:
        if matrix.sweep.search.algorithm == "optuna":
            on_demand[point.name] = "Optuna proposes trials one at a time"
            continue
        if sampled:
            on_demand[point.name] = f"sampled stage field(s) {', '.join(sampled)}"
            continue
        config = next(iter(matrix.corner_trials(point)))
        recipes = stage_recipes(config)
        digests = {stage: recipe_digest(r) for stage, r in recipes.items() if r is not None}
        for stage, digest in digests.items():
            entries[stage][digest].append(point.name)
        job_id = recipe_digest({"quantize": recipes["quantize"], "calibrate": recipes["calibrate"]})
        job = groups.setdefault(job_id, StageJob(job_id, calibrated="calibrate" in digests))
        job.points.append(point.name)
        if digests["initialize"] not in init_seen:
            init_seen.add(digests["initialize"])
            job.configs.append(config)
    repeats = matrix.sweep.search.num_samples if matrix.sweep.search.algorithm != "optuna" else 1
    shared = [job for job in groups.values() if len(job.points) * repeats > 1]
    for job in groups.values():
        if job not in shared:
            for name in job.points:
                on_demand[name] = "its stages are its own"
    return StageGraph(
        entries={stage: dict(e) for stage, e in entries.items()},
        jobs=shared,
        job_of={name: job.id for job in shared for name in job.points},
        on_demand=on_demand,
    )


def describe_stage_graph(graph: StageGraph) -> str:
    """What `quailora plan` prints: distinct entries per stage, the stage jobs and the trials each serves."""
    counts = ", ".join(f"{stage} {n} ({shared} shared)" for stage, (n, shared) in graph.counts().items())
    lines = [f"stages: distinct entries: {counts}"]
    for job in graph.jobs[:SHOWN_JOBS]:
        kind = "calibrated" if job.calibrated else "uncalibrated"
        shown = ", ".join(job.points[:SHOWN]) + (
            f", ... ({len(job.points) - SHOWN} more)" if len(job.points) > SHOWN else ""
        )
        lines.append(
            f"  stage job {job.id} ({kind}): {len(job.configs)} init key(s), ahead of "
            f"{len(job.points)} grid point(s): {shown}"
        )
    if len(graph.jobs) > SHOWN_JOBS:
        lines.append(f"  ... {len(graph.jobs) - SHOWN_JOBS} more stage jobs")
    if graph.on_demand:
        reasons = sorted(set(graph.on_demand.values()))
        lines.append(
            f"  on demand (inside the trial): {len(graph.on_demand)} grid point(s): {'; '.join(reasons)}"
        )
    return "\n".join(lines)
