"""QuAILoRA step 2: alternating least squares on the calibrated objective, started from the SVD init.

Each half-step is an exact minimizer (only r x r systems are solved), so the objective never increases.
history holds tr((E − MA) H (E − MA)ᵀ) / tr(E H Eᵀ) with the damped H: first the SVD start, then one
value per iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.linalg import FactorSplit, SvdSolver, balanced_factors, damp, truncated_svd

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register("quailora", needs_gram=True)
def quailora(
    problem: InitProblem,
    *,
    iterations: int = 20,
    damping: float = 1e-2,
    tol: float = 0.0,
    solver: SvdSolver = "auto",
    niter: int = 4,
    oversample: int = 8,
    seed: int = 0,
    split: FactorSplit = "balanced",
) -> Initialization:
    e = problem.error
    h = damp(problem.gram, damping)
    u, s, vh = truncated_svd(e, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed)
    root = s.sqrt()
    m, a = u * root, root[:, None] * vh
    base = float(((e @ h) * e).sum())  # tr(E H Eᵀ), once: O(m n²)

    h_at = h @ a.T
    history = [_objective(base, e, m, a, h_at)]
    for _ in range(iterations):
        # fix A: M = E H Aᵀ (A H Aᵀ)⁻¹
        m = torch.linalg.solve(a @ h_at, (e @ h_at).T).T
        # fix M: A = (MᵀM)⁻¹ Mᵀ E (H cancels when H ≻ 0)
        a = torch.linalg.solve(m.T @ m, m.T @ e)
        h_at = h @ a.T
        history.append(_objective(base, e, m, a, h_at))
        if tol > 0 and history[-2] - history[-1] <= tol * history[-2]:
            break
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, split)
    return Initialization(lora_a, lora_b, problem.quantized, history)


def _objective(base: float, e: torch.Tensor, m: torch.Tensor, a: torch.Tensor, h_at: torch.Tensor) -> float:
    """Relative calibrated error from r-sized pieces: (tr(EHEᵀ) − 2 tr(Mᵀ E H Aᵀ) + tr(MᵀM · A H Aᵀ)) / tr(EHEᵀ)."""
    cross = float((m * (e @ h_at)).sum())
    quad = float(((m.T @ m) * (a @ h_at)).sum())
    return (base - 2 * cross + quad) / base
