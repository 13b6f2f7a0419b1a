"""Calibrated init for QA-LoRA: the exact minimizer of tr((E − Y P) H (E − Y P)ᵀ) over rank-r Y = s·B·A.

P (n/L x n) is QA-LoRA's pooling, with peft's scale (quailora.qalora.pooling). Expanding the objective,
tr(Y G Yᵀ) − 2 tr(Y Cᵀ) + const with G = P H Pᵀ = Rᵀ R and C = E H Pᵀ, i.e. ‖Y Rᵀ − C R⁻¹‖²_F + const,
so Y = SVD_r(C R⁻¹) R⁻ᵀ. Only (n/L)-sized systems are factored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, pooled_width, register
from quailora.initializers.options import FINITE_NONNEGATIVE, SvdOptions, integers_from, option
from quailora.linalg import balanced_factors, damped_cholesky
from quailora.qalora.pooling import pool_gram

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass(frozen=True, kw_only=True)
class QaloraClosedFormOptions(SvdOptions):
    """group_size: the adapter's pooling group L (required; a trial passes quant.group_size). damping: λ in
    G + λ·mean(diag G)·I for the pooled Gram G = P H Pᵀ."""

    group_size: int = option(domain=integers_from(1))
    damping: float = option(1e-2, domain=FINITE_NONNEGATIVE)


@register("qalora_closed_form", options=QaloraClosedFormOptions, adapter="pooled", needs_gram=True)
def qalora_closed_form(problem: InitProblem, o: QaloraClosedFormOptions) -> Initialization:
    pooled_width(problem, o.group_size)
    g, h_pt = pool_gram(problem.gram, o.group_size)
    chol = damped_cholesky(g, o.damping, name=problem.name, what="pooled Gram P H Pᵀ")  # G = L Lᵀ, R = Lᵀ
    c = problem.error @ h_pt
    # C R⁻¹ = C L⁻ᵀ: solve X Lᵀ = C.
    z = torch.linalg.solve_triangular(chol.T, c, upper=True, left=False)
    u, s, vh = o.svd(z, problem.rank)
    root = s.sqrt()
    m = u * root
    # A = Σ½ Vᵀ R⁻ᵀ = Σ½ Vᵀ L⁻¹: solve X L = Σ½ Vᵀ.
    a = torch.linalg.solve_triangular(chol, root[:, None] * vh, upper=False, left=False)
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, o.split)
    return Initialization(lora_a, lora_b, problem.quantized)
