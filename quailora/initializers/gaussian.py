"""QLoRA baseline: peft's default init (A Kaiming-uniform, B = 0), so the model starts exactly at Q."""

from __future__ import annotations

import math

import torch

from quailora.initializers.base import INITIALIZERS, Initialization, InitProblem


@INITIALIZERS.register("gaussian")
def gaussian(problem: InitProblem, *, seed: int = 0) -> Initialization:
    out_features, in_features = problem.weight.shape
    gen = torch.Generator(device=problem.weight.device).manual_seed(seed)
    lora_a = torch.empty(problem.rank, in_features, device=problem.weight.device)
    # Same bound as nn.init.kaiming_uniform_(a=sqrt(5)), which peft uses, but with our own generator.
    bound = 1.0 / math.sqrt(in_features)
    lora_a.uniform_(-bound, bound, generator=gen)
    lora_b = torch.zeros(out_features, problem.rank, device=problem.weight.device)
    return Initialization(lora_a, lora_b, problem.quantized)
