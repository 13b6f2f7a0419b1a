"""Calibrated init for QA-LoRA: the exact minimizer of tr((E − Y P) H (E − Y P)ᵀ) over rank-r Y = s·B·A.

P (n/L x n) is QA-LoRA's pooling, with peft's scale (quailora.qalora.pooling). Expanding the objective,
tr(Y G Yᵀ) − 2 tr(Y Cᵀ) + const with G = P H Pᵀ = Rᵀ R and C = E H Pᵀ, i.e. ‖Y Rᵀ − C R⁻¹‖²_F + const,
so Y = SVD_r(C R⁻¹) R⁻ᵀ. Only (n/L)-sized systems are factored.
"""

from __future__ import annotations

import torch

from quailora.errors import QuailoraInputError
from quailora.initializers.base import INITIALIZERS, Initialization, InitProblem, calibrated
from quailora.initializers.qalora_zero import pooled_width
from quailora.linalg import balanced_factors, damp
from quailora.qalora.pooling import pool_gram


@INITIALIZERS.register("qalora_closed_form")
@calibrated
def qalora_closed_form(problem: InitProblem, *, group_size: int, damping: float = 1e-2) -> Initialization:
    pooled_width(problem, group_size)
    if not damping >= 0:
        raise QuailoraInputError(f"layer {problem.name}: damping={damping!r} must be >= 0")
    error = problem.error
    g, h_pt = pool_gram(problem.gram, group_size)
    chol, info = torch.linalg.cholesky_ex(damp(g, damping))  # G = L Lᵀ, so R = Lᵀ
    if info:
        raise QuailoraInputError(
            f"layer {problem.name}: pooled Gram P H Pᵀ is not positive definite with damping={damping}; raise it"
        )
    c = error @ h_pt
    # C R⁻¹ = C L⁻ᵀ: solve X Lᵀ = C.
    z = torch.linalg.solve_triangular(chol.T, c, upper=True, left=False)
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    root = s[: problem.rank].sqrt()
    m = u[:, : problem.rank] * root
    # A = Σ½ Vᵀ R⁻ᵀ = Σ½ Vᵀ L⁻¹: solve X L = Σ½ Vᵀ.
    a = torch.linalg.solve_triangular(chol, root[:, None] * vh[: problem.rank], upper=False, left=False)
    lora_a, lora_b = balanced_factors(m, a, problem.scaling)
    return Initialization(lora_a, lora_b, problem.quantized)
