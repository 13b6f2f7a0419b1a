"""What a sweep leaves on disk, from its trial configs and model shapes alone: the stage cache's entries, each
trial's checkpoints and its MLflow artifacts (`quailora plan` prints it above the table).

Tensor bytes, by the formulas of the code that writes them (each function says which); the small JSON
files beside them (indexes, configs, histories) are not counted. A stage entry is counted once per distinct
recipe (trials/stage_plan.py: what its cache key is made from), as the shared cache computes it once; a
stage that a sampled field makes each trial's own, or a sweep with ``share_stages: false`` (private
caches), counts one per trial.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.expand import TrialMatrix
from orchestrator.memory import (
    PROBE_ROWS,
    activation_bytes,
    adapter_params,
    base_residual_params,
    quantized_linear_bytes,
    weight_bytes,
)
from orchestrator.model_shapes import ModelShape
from quailora.initializers import needs_gram
from trials.checkpoint_policy import CHECKPOINTS_KEPT, checkpoint_policy
from trials.config import TrialConfig
from trials.contract import PROBE_TOP_K, STAGES
from trials.stage_plan import recipe_digest, stage_recipes

ShapeOf = Callable[[str], ModelShape]


def quantize_entry_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """trials.stages.quantize saves the loaded quantized model (the backend's save: save_pretrained, or the
    packed/compressed INT-k files): its quantized linears as the quantizer stores them and the other weights
    at the load dtype, what a worker holds (orchestrator.memory). An upper bound for the models restructured
    after loading (GPT-2, Falcon, MoE: trials.quantized_model.has_stock_quantized_form), which store none."""
    return quantized_linear_bytes(trial, shape) + shape.other_params * weight_bytes(trial)


def gram_bytes(n: int) -> int:
    """One stored Gram of an n-wide input: its upper triangle in fp32 (quailora.calibration.store.pack_gram)."""
    return 4 * n * (n + 1) // 2


def calibrate_entry_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """quailora.calibration.store: per decoder layer one safetensors file with a Gram per distinct linear
    input (ModelShape.gram_inputs: q/k/v and gate/up read one tensor, one Gram)."""
    if not needs_gram(trial.init.method):
        return 0
    return sum(gram_bytes(n) for i in range(len(shape.linear_layers)) for n in shape.gram_inputs(i))


def initialize_entry_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """quailora.peft_init.save_updates: A and B of every targeted linear in fp32 (as the methods solve them),
    plus the thin base residuals of a method that moves Q (LoftQ)."""
    return 4 * (adapter_params(trial, shape) + base_residual_params(trial, shape))


ENTRY_BYTES: dict[str, Callable[[TrialConfig, ModelShape], int]] = {
    "quantize": quantize_entry_bytes,
    "calibrate": calibrate_entry_bytes,
    "initialize": initialize_entry_bytes,
}


def trainable_bytes(trial: TrialConfig) -> int:
    """Bytes per trainable parameter as trained and saved: DeepSpeed casts the module's parameters to bf16
    or fp16 when that precision is enabled (DeepSpeedEngine._configure_distributed_model), else fp32."""
    return activation_bytes(trial)


def checkpoint_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """One mid-run checkpoint (trials.checkpointing.save_training_state): the N trainable parameters at their
    dtype and, over all ranks, ZeRO's fp32 master copy and Adam's two fp32 moments: N·(p + 4 + 8). The frozen
    quantized base is not in it."""
    return adapter_params(trial, shape) * (trainable_bytes(trial) + 4 + 8)


def final_checkpoint_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """The checkpoint at the end (trials.checkpointing.save_final_state): the trained adapter alone, N·p; the
    one a trial leaves in storage."""
    return adapter_params(trial, shape) * trainable_bytes(trial)


def checkpoints_mid_run(trial: TrialConfig, shape: ModelShape) -> bool:
    """Whether the trial may checkpoint before its last step (a time-based interval: assumed so)."""
    policy = checkpoint_policy(trial.train, shape.num_parameters())
    return policy.minutes is not None or 0 < policy.steps < trial.train.max_steps


def checkpoint_peak_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """The most a trial's checkpoints occupy in storage at once: Ray Train keeps CHECKPOINTS_KEPT and deletes
    the older one only after the next is persisted, so two mid-run checkpoints for a moment."""
    if checkpoints_mid_run(trial, shape):
        return (CHECKPOINTS_KEPT + 1) * checkpoint_bytes(trial, shape)
    return final_checkpoint_bytes(trial, shape)


def artifact_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """trials.worker._save_adapter_and_probe: the adapter (peft safetensors: the trainable parameters at their
    dtype) and the probe (trials/probe.py: two validation blocks' int64 ids, each position's top-K fp32 logits
    with int32 token ids and an fp32 log-sum-exp, 2·s·(8 + 8·K + 4)); a method that moves Q also logs its
    base residuals in fp32 (trials.worker.RankZeroTracker.changed_base)."""
    probe = PROBE_ROWS * trial.data.seq_len * (8 + 8 * min(PROBE_TOP_K, shape.vocab) + 4)
    n = adapter_params(trial, shape)
    return n * trainable_bytes(trial) + probe + 4 * base_residual_params(trial, shape)


@dataclass
class Entries:
    """The entries of one stage: their sizes (bytes, one per entry), and whether count and sizes are only
    upper bounds (draws of a sampled field may coincide; Optuna need not visit every grid point)."""

    sizes: list[int] = field(default_factory=list)
    bounded: bool = False

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass
class PerTrial:
    """A per-trial figure: (trials, bytes each) pairs, and whether it is an upper bound."""

    counts: list[tuple[int, int]] = field(default_factory=list)
    bounded: bool = False

    @property
    def total(self) -> int:
        return sum(n * size for n, size in self.counts)

    @property
    def sizes(self) -> list[int]:
        return [size for n, size in self.counts if n]


@dataclass
class SweepFootprint:
    trials: int
    entries: dict[str, Entries]
    checkpoints: PerTrial  # bytes of the checkpoint a trial leaves (the final one)
    checkpoint_peak: PerTrial  # the most a running trial's checkpoints occupy at once
    artifacts: PerTrial

    @property
    def cache_total(self) -> int:
        return sum(e.total for e in self.entries.values())


def sweep_footprint(matrix: TrialMatrix, shape_of: ShapeOf) -> SweepFootprint:
    """Each grid point at its worst sampled corner, as plan sizes memory."""
    sweep = matrix.sweep
    optuna = sweep.search.algorithm == "optuna"
    repeats = 1 if optuna else sweep.search.num_samples
    shared: dict[str, dict[str, int]] = {stage: {} for stage in STAGES}  # digest -> bytes
    own: dict[str, list[int]] = {stage: [] for stage in STAGES}  # per grid point: bytes of each trial's own
    checkpoints, checkpoint_peak, artifacts = PerTrial(), PerTrial(), PerTrial()
    for point in matrix.points:
        corners = [(t, shape_of(t.model.path)) for t in matrix.corner_trials(point)]
        for stage, size_of in ENTRY_BYTES.items():
            made = [(recipe_digest(r), size_of(t, s)) for t, s in corners if (r := stage_recipes(t)[stage])]
            if not made:
                continue  # a stage this point skips (calibrate, for an init without a Gram)
            if sweep.share_stages and len({digest for digest, _ in made}) == 1:
                shared[stage][made[0][0]] = made[0][1]
            else:
                own[stage].append(max(size for _, size in made))
        for figure, size_of in ((checkpoints, final_checkpoint_bytes), (checkpoint_peak, checkpoint_peak_bytes),
                                (artifacts, artifact_bytes)):  # fmt: skip
            sizes = {size_of(t, s) for t, s in corners}
            figure.counts.append((repeats, max(sizes)))
            figure.bounded |= len(sizes) > 1
    entries = {}
    for stage in STAGES:
        fixed, mine = list(shared[stage].values()), own[stage]
        if not optuna:
            entries[stage] = Entries(fixed + [size for size in mine for _ in range(repeats)],
                                     bounded=bool(mine) and sweep.share_stages)  # fmt: skip
            continue
        # Optuna runs num_samples trials over the points: each computes at most one entry per stage.
        candidates = sorted(fixed + mine * matrix.num_trials, reverse=True)
        entries[stage] = Entries(candidates[: matrix.num_trials], bounded=True)
    if optuna:
        for figure in (checkpoints, checkpoint_peak, artifacts):
            figure.counts = [(matrix.num_trials, max(figure.sizes, default=0))]
            figure.bounded = True
    return SweepFootprint(matrix.num_trials, entries, checkpoints, checkpoint_peak, artifacts)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _span(sizes: list[int]) -> str:
    low, high = min(sizes), max(sizes)
    return human(high) if low == high else f"{human(low)} to {human(high)}"


def describe_footprint(fp: SweepFootprint, cache_path: str | None) -> str:
    """The summary `quailora plan` prints first: distinct stage computations with their disk, and the
    checkpoints and artifacts of the trials; "≤" marks an upper bound."""

    def bound(flag: bool) -> str:
        return "≤ " if flag else ""

    kinds = [
        f"{stage} {bound(e.bounded)}{len(e.sizes)}"
        + (f" x {_span(e.sizes)} = {bound(e.bounded)}{human(e.total)}" if e.sizes else "")
        for stage, e in fp.entries.items()
    ]
    where = (
        f"the stage cache {cache_path}"
        if cache_path
        else "each trial's private stage cache (share_stages: false)"
    )
    any_bound = any(e.bounded for e in fp.entries.values())
    lines = [
        f"summary: {fp.trials} trials",
        f"  stage computations (disk per entry, in {where}): {'; '.join(kinds)}; "
        f"{bound(any_bound)}{human(fp.cache_total)} in all",
    ]
    for name, figure, what, summed in (
        ("checkpoints", fp.checkpoints, "the final one each trial leaves: its trained adapter", True),
        ("checkpoints while training", fp.checkpoint_peak, "the most at once, mid-run ones holding trainable "
         "parameters + fp32 master + Adam moments, two while one replaces the other", False),
        ("artifacts", fp.artifacts, "adapter + probe top logits, in MLflow", True),
    ):  # fmt: skip
        if figure.sizes:
            total = f", {bound(figure.bounded)}{human(figure.total)} in all" if summed else ""
            lines.append(f"  {name} ({what}): {bound(figure.bounded)}{_span(figure.sizes)} per trial{total}")
    return "\n".join(lines)
