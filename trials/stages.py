"""The three cached stages of a trial: quantize, calibrate, initialize.

Each runs on every worker of the trial together, keyed by trials/stage_keys.py and obtained through the
shared StageCache: computed once per key across every trial that shares the cache, reused after that
(by a later trial, another learning rate, or this trial's restart). How the work is shared out:
- quantize: every worker loads the quantized model (from the cached entry when there is one; else it
  quantizes the full-precision checkpoint and rank 0 stores the result).
- calibrate: data-parallel over the calibration sequences; per layer the Gram sums are all-reduced and
  rank 0 writes them (quailora.calibration.distributed).
- initialize: each worker solves its share of decoder layers; only the thin adapters (and, for methods
  that move Q, the thin factors Q was quantized from) are gathered, on the CPU; each worker rebuilds any
  changed base layer from its own streamed full-precision weight.
Only rank 0 touches the cache; an entry another rank must read reaches it through trials/stage_transfer.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quailora.architectures import Layout, ModelWeights, load_model_config
from quailora.architectures.derive import PEFT_PREFIX
from quailora.calibration import GramStore, ProcessGroupSum, collect_grams, partition_layers, sequence_share
from quailora.initializers import needs_gram
from quailora.peak_memory import PhasePeaks
from quailora.peft_init import (
    LayerUpdate,
    apply_adapters,
    compute_adapters,
    load_updates,
    lora_layer_names,
    save_updates,
)
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.zero_start import add_zero_start
from trials.adapters import build_adapter
from trials.cache import StageCache, StageKey, StageOutcome, obtain
from trials.config import TrialConfig
from trials.quantized_model import (
    has_stock_quantized_form,
    load_quantized_model,
    load_saved_quantized_model,
    quantizer_for,
    save_quantized_model,
)
from trials.stage_keys import calibrate_key, initialize_key, quantize_key
from trials.stage_plan import init_key_options
from trials.stage_transfer import EntryTransfer


class TrialGroup:
    """The trial's workers as a cache ``Group``: rank 0 leads, decisions are broadcast from it."""

    def __init__(self, device: torch.device) -> None:
        self.leader = dist.get_rank() == 0
        self.device = device

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


@dataclass
class StageContext:
    """What every stage reads: the trial, where its checkpoint is, the worker's device and dtype, the cache,
    and how entries reach this worker from rank 0 (one EntryTransfer may serve several contexts)."""

    config: TrialConfig
    checkpoint: Path
    device: torch.device
    dtype: torch.dtype
    cache: StageCache
    transfer: EntryTransfer | None = None  # default: every rank on one node
    peaks: PhasePeaks | None = None  # given: each stage's own peak memory is measured into its outcome

    def __post_init__(self) -> None:
        if self.transfer is None:
            self.transfer = EntryTransfer(0, self.device, "local")

    @property
    def group(self) -> TrialGroup:
        return TrialGroup(self.device)


def _whole(outcome: StageOutcome, began: float) -> StageOutcome:
    """The outcome timed over the whole stage: a reuse's seconds include loading the entry, not only finding it."""
    return dataclasses.replace(outcome, seconds=time.perf_counter() - began)


def quantize(ctx: StageContext) -> tuple[nn.Module, StageKey, StageOutcome]:
    """The quantized base model on this worker's device."""
    began = time.perf_counter()
    key = quantize_key(ctx.config, ctx.checkpoint, ctx.dtype)
    loaded: dict[str, nn.Module] = {}

    def compute(tmp: Path | None) -> None:
        loaded["model"] = load_quantized_model(ctx.checkpoint, ctx.config, ctx.dtype, ctx.device)
        if tmp is not None:  # before any forward: bnb's CPU path repacks weights on the first one
            save_quantized_model(loaded["model"], ctx.config, tmp)

    if not has_stock_quantized_form(load_model_config(ctx.checkpoint, "model.path")):
        compute(None)
        return loaded["model"], key, _whole(StageOutcome("quantize", "computed", key.digest), began)
    outcome = obtain(ctx.cache, key, compute, ctx.group)
    model = loaded.get("model") or load_saved_quantized_model(
        ctx.transfer.entry(outcome.path), ctx.config, ctx.dtype, ctx.device
    )
    return model, key, _whole(outcome, began)


def calibrate(
    ctx: StageContext, calib_ids: torch.Tensor | None
) -> tuple[GramStore | None, StageKey | None, StageOutcome]:
    """The Grams of every LoRA-able input, for calibrated methods; skipped for the others."""
    if not needs_gram(ctx.config.init.method):
        return None, None, StageOutcome("calibrate", "skipped")
    began = time.perf_counter()
    cal = ctx.config.calibration
    key = calibrate_key(ctx.config, ctx.checkpoint, calib_ids, ctx.dtype)

    def compute(tmp: Path | None) -> None:
        collect_grams(
            ctx.checkpoint,
            sequence_share(calib_ids, dist.get_rank(), dist.get_world_size()),
            tmp,
            propagate=cal.propagate,
            quantizer=quantizer_for(ctx.config.quant) if cal.propagate == "quantized" else None,
            device=ctx.device,
            forward_dtype=ctx.dtype,
            reducer=ProcessGroupSum(ctx.device),
        )

    outcome = obtain(ctx.cache, key, compute, ctx.group)
    return GramStore(ctx.transfer.entry(outcome.path)), key, _whole(outcome, began)


def my_layers(model: nn.Module, names: list[str], rank: int, world_size: int) -> list[str]:
    """This worker's share: whole decoder layers, balanced; modules outside any decoder layer go to rank 0.
    Layer indices come from the model's own decoder layers (a name that is no module of it is an error)."""
    layout = Layout.of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    index = {name: layout.layer_index(name) for name in names}
    mine = set(partition_layers(sorted({i for i in index.values() if i is not None}), world_size)[rank])
    return [n for n in names if (index[n] in mine) or (index[n] is None and rank == 0)]


def _solve_shared(
    model: nn.Module, ctx: StageContext, weights: ModelWeights, grams: GramStore | None
) -> dict[str, LayerUpdate]:
    """Every worker solves its layers; the updates are gathered as CPU tensors (pickled CUDA tensors
    would unpickle onto the sender's GPU index, creating contexts on peers' devices)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    options = init_key_options(ctx.config)  # the options the initialize key reads, seed included
    names = my_layers(model, lora_layer_names(model), rank, world_size)
    mine = compute_adapters(model, ctx.config.init.method, weights, grams, names=names, **options)
    shares: list[dict[str, LayerUpdate]] = [{} for _ in range(world_size)]
    dist.all_gather_object(shares, {name: update.cpu() for name, update in mine.items()})
    return {name: update for share in shares for name, update in share.items()}


def initialize(
    ctx: StageContext,
    model: nn.Module,
    grams: GramStore | None,
    target_names: list[str],
    quantized: StageKey,
    calibrated: StageKey | None,
) -> tuple[StageKey, StageOutcome, dict[str, LayerUpdate]]:
    """Initialize every LoRA layer of ``model`` in place, on every worker; returns the updates too."""
    began = time.perf_counter()
    key = initialize_key(ctx.config, quantized, calibrated, target_names)
    weights = ModelWeights(ctx.checkpoint)
    solved: dict[str, dict[str, LayerUpdate]] = {}

    def compute(tmp: Path | None) -> None:
        solved["updates"] = _solve_shared(model, ctx, weights, grams)
        if tmp is not None:
            save_updates(solved["updates"], tmp)

    outcome = obtain(ctx.cache, key, compute, ctx.group)
    updates = solved.get("updates") or load_updates(ctx.transfer.entry(outcome.path))
    apply_adapters(model, updates, weights=weights)
    return key, _whole(outcome, began), updates


def uncalibrated_note(updates: dict[str, LayerUpdate], shown: int = 8) -> str | None:
    """The UNCALIBRATED_TAG value: how many layers fell back to the uncalibrated solve, and the first few."""
    names = sorted(name.removeprefix(PEFT_PREFIX) for name, u in updates.items() if u.uncalibrated)
    if not names:
        return None
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return (
        f"{len(names)} of {len(updates)} layers solved with H = I (fewer calibration tokens than inputs): "
        + ", ".join(names[:shown])
        + more
    )


def prepare_model(
    ctx: StageContext,
    calib_ids: torch.Tensor | None,
    target_names: list[str],
    before_adapter: Callable[[nn.Module], None] = lambda base: None,
) -> tuple[nn.Module, list[StageOutcome], dict[str, LayerUpdate]]:
    """The three stages in order, on every worker: the adapted, initialized model, each stage's outcome and
    the init's updates. ``before_adapter`` sees the quantized base before LoRA wraps it (a trial measures it
    and turns gradient checkpointing on there)."""
    base, quantized, quantize_outcome = quantize(ctx)
    quantize_outcome = _with_peak(ctx, quantize_outcome)
    grams, calibrated, calibrate_outcome = calibrate(ctx, calib_ids)
    calibrate_outcome = _with_peak(ctx, calibrate_outcome)
    before_adapter(base)
    model = build_adapter(base, ctx.config, target_names)
    if ctx.device.type == "cpu":
        exact_cpu_4bit(model)  # evaluation then computes with Q in the model's dtype, as on CUDA
    _, initialize_outcome, updates = initialize(ctx, model, grams, target_names, quantized, calibrated)
    initialize_outcome = _with_peak(ctx, initialize_outcome)
    if ctx.config.init.zero_start:  # not part of the init entry: rebuilt from it here, on a resume too
        add_zero_start(model)
    return model, [quantize_outcome, calibrate_outcome, initialize_outcome], updates


def _with_peak(ctx: StageContext, outcome: StageOutcome) -> StageOutcome:
    if ctx.peaks is None:
        return outcome
    return dataclasses.replace(outcome, peak_memory_mb=ctx.peaks.end_span()["peak_memory_mb"])
