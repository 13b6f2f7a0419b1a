"""Calibrated init for QA-LoRA: the exact minimizer of tr((E − Y P) H (E − Y P)ᵀ) over rank-r Y = s·B·A.

P (n/L x n) is QA-LoRA's pooling, with peft's scale (quailora.qalora.pooling). Expanding the objective,
tr(Y G Yᵀ) − 2 tr(Y Cᵀ) + const with G = P H Pᵀ = Rᵀ R and C = E H Pᵀ, i.e. ‖Y Rᵀ − C R⁻¹‖²_F + const,
so Y = SVD_r(C R⁻¹) R⁻ᵀ. Only (n/L)-sized systems are factored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, pooled_width, register
from quailora.linalg import FactorSplit, SvdSolver, balanced_factors, damped_cholesky, truncated_svd
from quailora.qalora.pooling import pool_gram

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register("qalora_closed_form", adapter="pooled", needs_gram=True)
def qalora_closed_form(
    problem: InitProblem,
    *,
    group_size: int,
    damping: float = 1e-2,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    split: FactorSplit = "balanced",
) -> Initialization:
    pooled_width(problem, group_size)
    g, h_pt = pool_gram(problem.gram, group_size)
    chol = damped_cholesky(g, damping, name=problem.name, what="pooled Gram P H Pᵀ")  # G = L Lᵀ, R = Lᵀ
    c = problem.error @ h_pt
    # C R⁻¹ = C L⁻ᵀ: solve X Lᵀ = C.
    z = torch.linalg.solve_triangular(chol.T, c, upper=True, left=False)
    u, s, vh = truncated_svd(z, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed)
    root = s.sqrt()
    m = u * root
    # A = Σ½ Vᵀ R⁻ᵀ = Σ½ Vᵀ L⁻¹: solve X L = Σ½ Vᵀ.
    a = torch.linalg.solve_triangular(chol, root[:, None] * vh, upper=False, left=False)
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, split)
    return Initialization(lora_a, lora_b, problem.quantized)
