"""Exact minimizer of the calibrated objective tr((E − MA) H (E − MA)ᵀ) (also published as CLoQ).

With H = L Lᵀ (Cholesky, R = Lᵀ) the objective is ‖(E − MA) L‖²_F, so MA = SVD_r(E L) L⁻¹.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.linalg import FactorSplit, SvdSolver, balanced_factors, damped_cholesky, truncated_svd

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register("closed_form", needs_gram=True)
def closed_form(
    problem: InitProblem,
    *,
    damping: float = 1e-2,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    split: FactorSplit = "balanced",
) -> Initialization:
    chol = damped_cholesky(problem.gram, damping, name=problem.name)
    u, s, vh = truncated_svd(
        problem.error @ chol, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed
    )
    root = s.sqrt()
    m = u * root
    # A = Σ½ Vᵀ L⁻¹, i.e. Lᵀ Aᵀ = V Σ½: a triangular solve, no inverse formed.
    a = torch.linalg.solve_triangular(chol.T, (vh.T * root), upper=True).T
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, split)
    return Initialization(lora_a, lora_b, problem.quantized)
