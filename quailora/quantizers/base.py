"""The quantizer interface: every quantizer gives back Q = dequant(quant(W)) exactly as the model computes with it;
and the settings a trial quantizes with, which specs and backends read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Quantizer(Protocol):
    name: str
    bits: int

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Return dequant(quant(weight)) as float32, same shape (out x in)."""
        ...


class QuantSettings(Protocol):
    """The quantization settings a trial gives (trials.config.QuantSpec has these fields)."""

    method: str
    bits: int
    blocksize: int
    double_quant: bool
    group_size: int
