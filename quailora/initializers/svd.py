"""QuAILoRA step 1 (uncalibrated): the rank-r truncated SVD of E = W − Q, optimal for ‖E − sBA‖_F."""

from __future__ import annotations

from quailora.initializers.base import Initialization, InitProblem, register
from quailora.initializers.options import SvdOptions
from quailora.linalg import split_svd


@register("svd", options=SvdOptions)  # the truncated SVD's options alone
def svd(problem: InitProblem, o: SvdOptions) -> Initialization:
    u, s, vh = o.svd(problem.error, problem.rank)
    lora_a, lora_b = split_svd(u, s, vh, problem.scaling, o.split)
    return Initialization(lora_a, lora_b, problem.quantized)
