"""bitsandbytes LLM.int8 weights: row-wise absmax int8, quantized from fp16 as Int8Params does.

The outlier path (llm_int8_threshold) acts on activations, not weights, so Q here is the weight the
int8 matmul uses; with threshold > 0 outlier input columns are computed from this same Q in fp16.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from quailora.errors import QuailoraInputError
from quailora.quantizers.base import QUANTIZERS


@QUANTIZERS.register("int8")
class Int8Quantizer:
    name = "int8"

    def __init__(self, bits: int = 8) -> None:
        if bits != 8:
            raise QuailoraInputError(f"quantizer 'int8': bits={bits} is not possible, only 8")
        self.bits = 8

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CB int8, SCB float32 row scales), as Int8Params._quantize computes them."""
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return cb, scb

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        cb, scb = self.quantize(weight)
        return bnbf.int8_vectorwise_dequant(cb, scb).to(torch.float32)
