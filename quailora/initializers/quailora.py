"""QuAILoRA step 2: alternating least squares on the calibrated objective, started from the SVD init.

Each half-step is an exact minimizer (only r x r systems are solved), so the objective never increases.
history holds tr((E − MA) H (E − MA)ᵀ) / tr(E H Eᵀ) with the damped H: first the SVD start, then one
value per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.initializers.options import FINITE_NONNEGATIVE, SvdOptions, integers_from, option
from quailora.linalg import balanced_factors, damp

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass(frozen=True, kw_only=True)
class QuailoraOptions(SvdOptions):
    """iterations: alternating steps after the SVD start. damping: λ in H + λ·mean(diag H)·I. tol: stop once
    an iteration lowers the objective by at most tol times its value (0: run all iterations)."""

    iterations: int = option(20, domain=integers_from(1))
    damping: float = option(1e-2, domain=FINITE_NONNEGATIVE)
    tol: float = option(0.0, domain=FINITE_NONNEGATIVE)


@register("quailora", options=QuailoraOptions, needs_gram=True)
def quailora(problem: InitProblem, o: QuailoraOptions) -> Initialization:
    e = problem.error
    h = damp(problem.gram, o.damping)
    u, s, vh = o.svd(e, problem.rank)
    root = s.sqrt()
    m, a = u * root, root[:, None] * vh
    base = float(((e @ h) * e).sum())  # tr(E H Eᵀ), once: O(m n²)

    h_at = h @ a.T
    history = [_objective(base, e, m, a, h_at)]
    for _ in range(o.iterations):
        # fix A: M = E H Aᵀ (A H Aᵀ)⁻¹
        m = torch.linalg.solve(a @ h_at, (e @ h_at).T).T
        # fix M: A = (MᵀM)⁻¹ Mᵀ E (H cancels when H ≻ 0)
        a = torch.linalg.solve(m.T @ m, m.T @ e)
        h_at = h @ a.T
        history.append(_objective(base, e, m, a, h_at))
        if o.tol > 0 and history[-2] - history[-1] <= o.tol * history[-2]:
            break
    lora_a, lora_b = balanced_factors(m, a, problem.scaling, o.split)
    return Initialization(lora_a, lora_b, problem.quantized, history)


def _objective(base: float, e: torch.Tensor, m: torch.Tensor, a: torch.Tensor, h_at: torch.Tensor) -> float:
    """Relative calibrated error from r-sized pieces: (tr(EHEᵀ) − 2 tr(Mᵀ E H Aᵀ) + tr(MᵀM · A H Aᵀ)) / tr(EHEᵀ)."""
    cross = float((m * (e @ h_at)).sum())
    quad = float(((m.T @ m) * (a @ h_at)).sum())
    return (base - 2 * cross + quad) / base
