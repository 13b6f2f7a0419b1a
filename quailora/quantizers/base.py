"""The quantizer interface: every quantizer gives back Q = dequant(quant(W)) exactly as the model computes with it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from quailora.registry import Registry


@runtime_checkable
class Quantizer(Protocol):
    name: str
    bits: int

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return dequant(quant(weight)) as float32, same shape (out x in)."""
        ...


QUANTIZERS: Registry[type] = Registry("quantizer")
