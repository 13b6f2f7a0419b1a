"""LoftQ, CPU-capable (peft's loftq_init runs only on CUDA/XPU).

Alternate T times: Q ← dequant(quant(W − sBA)), sBA ← SVD_r(W − Q). It changes the base weights:
the returned ``quantized`` must replace the model's quantized weight (peft_init does that, from W and
the thin ``base_residual``, the sBA that Q was quantized from).
history holds ‖W − Q − sBA‖_F / ‖W‖_F per iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quailora.errors import QuailoraInputError
from quailora.initializers.base import (
    Initialization,
    InitProblem,
    rebuilt_base,
    register,
)
from quailora.linalg import FactorSplit, SvdSolver, split_svd, truncated_svd

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@register("loftq", changes_base=True)
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

    def svd(q: torch.Tensor):
        u, s, vh = truncated_svd(
            w - q, problem.rank, solver=solver, niter=niter, oversample=oversample, seed=seed
        )
        history.append(float((w - q - (u * s) @ vh).norm()) / norm)
        return u, s, vh

    history: list[float] = []
    u, s, vh = svd(q)
    residual = None  # stays None when Q is unchanged (one iteration)
    for _ in range(iterations - 1):
        residual = (u * s, vh)  # the previous iteration's sBA
        q = problem.quantizer.fake_quantize(rebuilt_base(w, residual))
        u, s, vh = svd(q)
    lora_a, lora_b = split_svd(u, s, vh, problem.scaling, split)
    return Initialization(lora_a, lora_b, q, history, base_residual=residual)
