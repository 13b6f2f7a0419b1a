"""QuAILoRA step 1 (uncalibrated): the rank-r truncated SVD of E = W − Q, optimal for ‖E − sBA‖_F."""

from __future__ import annotations

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.linalg import FactorSplit, SvdSolver, split_svd, truncated_svd


@register("svd")
def svd(
    problem: InitProblem,
    *,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    split: FactorSplit = "balanced",
) -> Initialization:
    u, s, vh = truncated_svd(
        problem.error, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed
    )
    lora_a, lora_b = split_svd(u, s, vh, problem.scaling, split)
    return Initialization(lora_a, lora_b, problem.quantized)
