"""Exact minimizer of the calibrated objective tr((E − MA) H (E − MA)ᵀ) (also published as CLoQ).

With H = L Lᵀ (Cholesky, R = Lᵀ) the objective is ‖(E − MA) L‖²_F, so MA = SVD_r(E L) L⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.initializers.options import FINITE_NONNEGATIVE, SvdOptions, option
from quailora.linalg import balanced_factors, damped_cholesky

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass(frozen=True, kw_only=True)
class ClosedFormOptions(SvdOptions):
    """damping: λ in H + λ·mean(diag H)·I, so the Cholesky factor exists."""

    damping: float = option(1e-2, domain=FINITE_NONNEGATIVE)


@register("closed_form", options=ClosedFormOptions, needs_gram=True)
def closed_form(problem: InitProblem, o: ClosedFormOptions) -> Initialization:
    chol = damped_cholesky(problem.gram, o.damping, name=problem.name)
    u, s, vh = o.svd(problem.error @ chol, problem.rank)
    root = s.sqrt()
    m = u * root
    # A = Σ½ Vᵀ L⁻¹, i.e. Lᵀ Aᵀ = V Σ½: a triangular solve, no inverse formed.
    a = torch.linalg.solve_triangular(chol.T, (vh.T * root), upper=True).T
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, o.split)
    return Initialization(lora_a, lora_b, problem.quantized)
