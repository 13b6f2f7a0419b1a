"""bitsandbytes' quantizers as fake-quantizers: Q is what bitsandbytes itself dequantizes, so init and
training agree.

LLM.int8: row-wise absmax int8, quantized from fp16 as Int8Params does. Its outlier path
(llm_int8_threshold) acts on activations, not weights, so Q here is the weight the int8 matmul uses; with
threshold > 0 outlier input columns are computed from this same Q in fp16.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from quailora.errors import QuailoraInputError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class Bnb4bitQuantizer:
    def __init__(
        self,
        quant_type: str,
        bits: int = 4,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name = quant_type
        if bits != 4:
            raise QuailoraInputError(f"quantizer {self.name!r}: bits={bits} is not possible, only 4")
        if blocksize not in BLOCKSIZES:
            raise QuailoraInputError(f"quantizer {self.name!r}: blocksize={blocksize} not in {BLOCKSIZES}")
        self.bits = 4
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.dtype = dtype  # the dtype bitsandbytes quantizes from (the model's load dtype)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, bnbf.QuantState]:
        """Packed 4-bit codes and bitsandbytes' QuantState, exactly as Params4bit stores them."""
        return bnbf.quantize_4bit(
            weight.to(self.dtype).contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.name,
        )

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        packed, state = self.quantize(weight)
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)


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
