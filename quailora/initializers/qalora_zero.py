"""QA-LoRA's own init (arXiv 2309.14717): lora_A (r x n/L, it reads pooled inputs) Kaiming-uniform, B = 0."""

from __future__ import annotations

import math

import torch

from quailora.errors import QuailoraInputError
from quailora.initializers.base import INITIALIZERS, Initialization, InitProblem


def pooled_width(problem: InitProblem, group_size: int) -> int:
    """n / L after checking that the pooled problem is well posed (shared by the QA-LoRA initializers)."""
    out_features, in_features = problem.weight.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuailoraInputError(
            f"layer {problem.name}: group_size={group_size!r} must be a positive integer"
        )
    if in_features % group_size:
        raise QuailoraInputError(
            f"layer {problem.name}: in_features={in_features} is not divisible by group_size={group_size}"
        )
    quant_group = getattr(problem.quantizer, "group_size", None)
    if quant_group is not None and group_size % quant_group:
        raise QuailoraInputError(
            f"layer {problem.name}: group_size={group_size} must be a multiple of the quantizer's "
            f"group_size={quant_group}, or the update cannot merge into the zero points"
        )
    width = in_features // group_size
    if problem.rank > min(out_features, width):
        raise QuailoraInputError(
            f"layer {problem.name}: rank={problem.rank} exceeds min(out={out_features}, in/group_size={width})"
        )
    return width


@INITIALIZERS.register("qalora_zero")
def qalora_zero(problem: InitProblem, *, group_size: int, seed: int = 0) -> Initialization:
    width = pooled_width(problem, group_size)
    device = problem.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    # Same bound as peft's nn.Linear(n/L, r) default (kaiming_uniform_, a=sqrt(5)), with our own generator.
    bound = 1.0 / math.sqrt(width)
    lora_a = torch.empty(problem.rank, width, device=device).uniform_(-bound, bound, generator=gen)
    lora_b = torch.zeros(problem.weight.shape[0], problem.rank, device=device)
    return Initialization(lora_a, lora_b, problem.quantized)
