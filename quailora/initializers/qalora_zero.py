"""QA-LoRA's own init (arXiv 2309.14717): lora_A (r x n/L, it reads pooled inputs) Kaiming-uniform, B = 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quailora.initializers.base import (
    Initialization,
    InitProblem,
    kaiming_uniform,
    pooled_width,
    register,
)
from quailora.initializers.options import SeededOptions, integers_from, option

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass(frozen=True, kw_only=True)
class QaloraZeroOptions(SeededOptions):
    """group_size: the adapter's pooling group L (required; a trial passes quant.group_size)."""

    group_size: int = option(domain=integers_from(1))


@register("qalora_zero", options=QaloraZeroOptions, adapter="pooled", zero_product=True)
def qalora_zero(problem: InitProblem, o: QaloraZeroOptions) -> Initialization:
    device = problem.weight.device
    lora_a = kaiming_uniform(problem.rank, pooled_width(problem, o.group_size), o.seed, device)
    lora_b = torch.zeros(problem.weight.shape[0], problem.rank, device=device)
    return Initialization(lora_a, lora_b, problem.quantized)
