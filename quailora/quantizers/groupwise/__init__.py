"""Group-wise asymmetric INT-k round-to-nearest (the quantizer of QA-LoRA): codes in ``codes``, the frozen
base layer GroupwiseLinear in ``layer``, a checkpoint loaded straight into it in ``loading``, quailora's
packed on-disk format (the quantize stage's cache) in ``packed``, the compressed-tensors export in
``compressed``, the QuantBackend tying them together in ``backend``. None of them imports quailora.qalora
(the QA-LoRA adapter builds on this package, not the reverse). Bytes as stored: codes packed 32//k to an
int32 word over the whole weight, plus an fp16 scale and an fp32 zero point per group. Its zero points let
a pooled (QA-LoRA) adapter merge. Dequantizing for a forward and backward holds the unpacked int32 codes and
their fp32 values, 8 bytes per weight whatever the compute dtype (5.9 to 8.4 measured on CPU by
benchmarks/dequant_memory.py, whose 5 ms sampling can miss part of a peak)."""

from __future__ import annotations

from quailora.quantizers.base import QuantSettings
from quailora.quantizers.spec import QuantizerSpec, register_quantizer

SUPPORTED_BITS = (4, 2, 3, 8)  # the first is the default


def _linear_bytes(n_in: int, n_out: int, settings: QuantSettings) -> int:
    params = n_in * n_out
    return -(-params // (32 // settings.bits)) * 4 + (params // settings.group_size) * (2 + 4)


register_quantizer(
    QuantizerSpec(
        name="int",
        bits=SUPPORTED_BITS,
        settings=("group_size",),
        linear_bytes=_linear_bytes,
        dequant_bytes=lambda c: 8,
        export_format="compressed-tensors",
        backend_path="quailora.quantizers.groupwise.backend:INT",
        adapters=("plain", "pooled"),
    )
)
