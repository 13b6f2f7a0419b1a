"""LoftQ, CPU-capable (peft's loftq_init runs only on CUDA/XPU).

Alternate T times: Q ← dequant(quant(W − sBA)), sBA ← SVD_r(W − Q). It changes the base weights:
the returned ``quantized`` must replace the model's quantized weight (peft_init does that).
history holds ‖W − Q − sBA‖_F / ‖W‖_F per iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.errors import QuailoraInputError
from quailora.initializers.base import INITIALIZERS, Initialization, InitProblem, base_changing
from quailora.linalg import FactorSplit, SvdSolver, split_svd, truncated_svd

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@INITIALIZERS.register("loftq")
@base_changing
def loftq(
    problem: InitProblem,
    *,
    iterations: int = 5,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    split: FactorSplit = "balanced",
) -> Initialization:
    if problem.quantizer is None:
        raise QuailoraInputError(f"layer {problem.name}: method 'loftq' re-quantizes, so it needs quantizer=")
    w = problem.weight
    q = problem.quantized
    norm = float(w.norm())
    history = []
    target = None  # stays None when Q is unchanged (one iteration)
    low_rank = torch.zeros_like(w)
    for step in range(iterations):
        if step:
            target = w - low_rank
            q = problem.quantizer.fake_quantize(target)
        u, s, vh = truncated_svd(
            w - q, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed
        )
        low_rank = (u * s) @ vh
        history.append(float((w - q - low_rank).norm()) / norm)
    lora_a, lora_b = split_svd(u, s, vh, problem.scaling, split)
    return Initialization(lora_a, lora_b, q, history, base_weight=target)
