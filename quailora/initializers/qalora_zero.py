"""QA-LoRA's own init (arXiv 2309.14717): lora_A (r x n/L, it reads pooled inputs) Kaiming-uniform, B = 0."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.initializers.base import (
    Initialization,
    InitProblem,
    kaiming_uniform,
    pooled_width,
    register,
)

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register("qalora_zero", adapter="pooled")
def qalora_zero(problem: InitProblem, *, group_size: int, seed: int = 0) -> Initialization:
    device = problem.weight.device
    lora_a = kaiming_uniform(problem.rank, pooled_width(problem, group_size), seed, device)
    lora_b = torch.zeros(problem.weight.shape[0], problem.rank, device=device)
    return Initialization(lora_a, lora_b, problem.quantized)
