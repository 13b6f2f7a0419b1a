"""bitsandbytes 4-bit (NF4 / FP4): Q is what bitsandbytes itself dequantizes, so init and training agree."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from quailora.errors import QuailoraInputError
from quailora.quantizers.base import QUANTIZERS

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class _Bnb4bit:
    quant_type: str

    def __init__(
        self,
        bits: int = 4,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if bits != 4:
            raise QuailoraInputError(f"quantizer {self.name!r}: bits={bits} is not possible, only 4")
        if blocksize not in _BLOCKSIZES:
            raise QuailoraInputError(f"quantizer {self.name!r}: blocksize={blocksize} not in {_BLOCKSIZES}")
        self.bits = 4
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.dtype = dtype  # the dtype bitsandbytes quantizes from (the model's load dtype)

    @property
    def name(self) -> str:
        return self.quant_type

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, bnbf.QuantState]:
        """Packed 4-bit codes and bitsandbytes' QuantState, exactly as Params4bit stores them."""
        return bnbf.quantize_4bit(
            weight.to(self.dtype).contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
        )

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        packed, state = self.quantize(weight)
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)


@QUANTIZERS.register("nf4")
class NF4Quantizer(_Bnb4bit):
    quant_type = "nf4"


@QUANTIZERS.register("fp4")
class FP4Quantizer(_Bnb4bit):
    quant_type = "fp4"
