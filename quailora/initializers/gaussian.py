"""QLoRA baseline: peft's default init (A Kaiming-uniform, B = 0), so the model starts exactly at Q."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, kaiming_uniform, register
from quailora.initializers.options import SeededOptions

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register(
    "gaussian", options=SeededOptions, zero_product=True
)  # only the seed A is drawn from: it always draws
def gaussian(problem: InitProblem, o: SeededOptions) -> Initialization:
    out_features, in_features = problem.weight.shape
    device = problem.weight.device
    lora_a = kaiming_uniform(problem.rank, in_features, o.seed, device)
    lora_b = torch.zeros(out_features, problem.rank, device=device)
    return Initialization(lora_a, lora_b, problem.quantized)
