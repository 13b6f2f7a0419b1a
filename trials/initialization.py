"""The trial's adapter initialization, shared out across its workers.

Rank 0 collects the calibration Grams into the trial's directory (once; a restart reuses them), every
worker solves the LoRA layers of its share of decoder layers, and the small results are all-gathered so
every worker applies the same adapters. With several nodes the Gram directory must be shared storage,
as Ray Train's checkpoint storage already is.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from quailora.architectures import Layout, ModelWeights
from quailora.calibration import GramStore, collect_grams, partition_layers
from quailora.calibration.store import INDEX as GRAM_INDEX
from quailora.initializers import needs_gram
from quailora.peft_init import apply_adapters, compute_adapters, lora_layer_names
from trials.config import TrialConfig
from trials.quantized_model import quantizer_for


def _collect_or_reuse(config: TrialConfig, checkpoint: Path, calib_ids: torch.Tensor, gram_dir: Path) -> None:
    if (gram_dir / GRAM_INDEX).is_file():
        return
    quantizer = quantizer_for(config.quant) if config.calibration.propagate == "quantized" else None
    collect_grams(
        checkpoint, calib_ids, gram_dir, propagate=config.calibration.propagate, quantizer=quantizer
    )


def my_layers(model: nn.Module, names: list[str], rank: int, world_size: int) -> list[str]:
    """This worker's share: whole decoder layers, balanced; modules outside any decoder layer go to rank 0.
    Layer indices come from the model's own decoder layers (a name that is no module of it is an error)."""
    layout = Layout.of(model.get_base_model() if hasattr(model, "get_base_model") else model)
    index = {name: layout.layer_index(name) for name in names}
    mine = set(partition_layers(sorted({i for i in index.values() if i is not None}), world_size)[rank])
    return [n for n in names if (index[n] in mine) or (index[n] is None and rank == 0)]


def initialize_distributed(
    model: nn.Module,
    config: TrialConfig,
    checkpoint: Path,
    calib_ids: torch.Tensor | None,
    gram_dir: Path,
) -> dict[str, float]:
    """Initialize every LoRA layer of ``model`` in place on all workers; returns calib/init seconds."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    grams = None
    if needs_gram(config.init.method):
        if rank == 0:
            _collect_or_reuse(config, checkpoint, calib_ids, gram_dir)
        dist.barrier()
        grams = GramStore(gram_dir)
    calib_seconds = time.perf_counter() - start

    start = time.perf_counter()
    names = my_layers(model, lora_layer_names(model), rank, world_size)
    options = {
        "seed": config.seed,
        **config.init.options,
    }  # init.options.seed, if given, overrides the trial's
    updates = compute_adapters(
        model, config.init.method, ModelWeights(checkpoint), grams, names=names, **options
    )
    shares: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(shares, updates)
    apply_adapters(model, {name: update for share in shares for name, update in share.items()})
    return {"calib_seconds": calib_seconds, "init_seconds": time.perf_counter() - start}
