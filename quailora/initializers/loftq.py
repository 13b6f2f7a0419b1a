"""LoftQ, CPU-capable (peft's loftq_init runs only on CUDA/XPU).

Alternate T times: Q ← dequant(quant(W − sBA)), sBA ← SVD_r(W − Q). It changes the base weights:
the returned ``quantized`` must replace the model's quantized weight (peft_init does that, from W and
the thin ``base_residual``, the sBA that Q was quantized from).
history holds ‖W − Q − sBA‖_F / ‖W‖_F per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quailora.errors import QuailoraInputError
from quailora.initializers.base import (
    Initialization,
    InitProblem,
    rebuilt_base,
    register,
)
from quailora.initializers.options import SvdOptions, integers_from, option
from quailora.linalg import split_svd

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass(frozen=True, kw_only=True)
class LoftqOptions(SvdOptions):
    """iterations: alternations T (1: the SVD of W − Q alone, Q unchanged)."""

    iterations: int = option(5, domain=integers_from(1))


@register("loftq", options=LoftqOptions, changes_base=True)
def loftq(problem: InitProblem, o: LoftqOptions) -> Initialization:
    if problem.quantizer is None:
        raise QuailoraInputError(f"layer {problem.name}: method 'loftq' re-quantizes, so it needs quantizer=")
    w = problem.weight
    q = problem.quantized
    norm = float(w.norm())

    def svd(q: torch.Tensor):
        u, s, vh = o.svd(w - q, problem.rank)
        history.append(float((w - q - (u * s) @ vh).norm()) / norm)
        return u, s, vh

    history: list[float] = []
    u, s, vh = svd(q)
    residual = None  # stays None when Q is unchanged (one iteration)
    for _ in range(o.iterations - 1):
        residual = (u * s, vh)  # the previous iteration's sBA
        q = problem.quantizer.fake_quantize(rebuilt_base(w, residual))
        u, s, vh = svd(q)
    lora_a, lora_b = split_svd(u, s, vh, problem.scaling, o.split)
    return Initialization(lora_a, lora_b, q, history, base_residual=residual)
