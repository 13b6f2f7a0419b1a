"""What the project knows about each quantizer, readable without torch: one QuantizerSpec per name.

Each backend package (``quailora.quantizers.<backend>``) registers its specs in its ``__init__``, which
imports nothing heavy, so config validation and ``quailora plan`` (allowed bits, bytes per weight, adapter
kinds) never import torch or bitsandbytes. The spec names the backend object that does the work
(fake-quantize, loading, base-layer operations, stock export); ``backend()`` imports it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from quailora.quantizers.backend import QuantBackend
from quailora.quantizers.base import QuantSettings
from quailora.registry import Registry


@dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer. bits: the widths it can store, the first the default. settings: the other
    QuantSettings fields it reads. linear_bytes(n_in, n_out, settings): bytes of one quantized
    (n_out x n_in) weight as stored, for the memory plan. dequant_bytes(c): bytes per weight that a forward
    and backward through one quantized linear hold at once while dequantizing it, c being the compute
    dtype's bytes (benchmarks/dequant_memory.py measures them). adapters: the adapter kinds it carries
    (quailora.initializers.AdapterKind; "pooled" merges into zero points). export_format: the stock
    format its quantized model is written in. backend: ``"module:attribute"`` of its QuantBackend."""

    name: str
    bits: tuple[int, ...]
    settings: tuple[str, ...]
    linear_bytes: Callable[[int, int, QuantSettings], int]
    dequant_bytes: Callable[[int], int]
    export_format: str
    backend_path: str
    adapters: tuple[str, ...] = ("plain",)

    @property
    def default_bits(self) -> int:
        return self.bits[0]

    def options(self, settings: QuantSettings) -> dict:
        """The settings that shape this quantizer's weights: bits, then its own (others, e.g. a 4-bit
        quantizer's group_size, left out)."""
        return {"bits": settings.bits, **{key: getattr(settings, key) for key in self.settings}}

    def backend(self) -> QuantBackend:
        module, _, attribute = self.backend_path.partition(":")
        return getattr(importlib.import_module(module), attribute)


QUANTIZER_SPECS: Registry[QuantizerSpec] = Registry("quantizer")


def register_quantizer(spec: QuantizerSpec) -> QuantizerSpec:
    return QUANTIZER_SPECS.register(spec.name)(spec)


def quantizer_spec(name: str, where: str = "quant.method") -> QuantizerSpec:
    return QUANTIZER_SPECS.get(name, where=where)
