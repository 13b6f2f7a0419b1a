"""bitsandbytes: NF4 and FP4 (4-bit, per-block absmax) and LLM.int8 (8-bit, per-row absmax).

Bytes per weight as stored: 4-bit = 1/2 per weight + the absmax per block (fp32, or with double quant
one byte per block plus an fp32 per 256 blocks); LLM.int8 = 1 per weight + an fp32 scale per output row.
Dequantizing for a forward and backward (benchmarks/dequant_memory.py on CPU at bf16: 2.5 and 10.4 bytes
per weight): 4-bit holds one dequantized weight at the compute dtype plus the code lookup, c + 1; LLM.int8
is stated as 4 + 3c, fitted to that measurement (its parts not traced, nor measured on a GPU).
"""

from __future__ import annotations

from quailora.quantizers.base import QuantSettings
from quailora.quantizers.spec import QuantizerSpec, register_quantizer


def _4bit_bytes(n_in: int, n_out: int, settings: QuantSettings) -> int:
    params = n_in * n_out
    blocks = params // settings.blocksize
    absmax = blocks + (blocks // 256) * 4 if settings.double_quant else blocks * 4
    return params // 2 + absmax


def _int8_bytes(n_in: int, n_out: int, settings: QuantSettings) -> int:
    return n_in * n_out + 4 * n_out


for _name in ("nf4", "fp4"):
    register_quantizer(
        QuantizerSpec(
            name=_name,
            bits=(4,),
            settings=("blocksize", "double_quant"),
            linear_bytes=_4bit_bytes,
            dequant_bytes=lambda c: c + 1,
            export_format="bitsandbytes",
            backend_path=f"quailora.quantizers.bnb.backend:{_name.upper()}",
        )
    )
register_quantizer(
    QuantizerSpec(
        name="int8",
        bits=(8,),
        settings=(),
        linear_bytes=_int8_bytes,
        dequant_bytes=lambda c: 4 + 3 * c,
        export_format="bitsandbytes",
        backend_path="quailora.quantizers.bnb.backend:INT8",
    )
)
