"""What every initializer takes and returns, and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from quailora.quantizers.base import Quantizer
from quailora.registry import Registry


@dataclass
class InitProblem:
    """One layer's initialization problem. All tensors float32 on one device.

    weight: full-precision W (out x in); quantized: Q = dequant(quant(W)); gram: H = XᵀX/N (in x in)
    or None; scaling: peft's s (lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA).
    """

    weight: torch.Tensor
    quantized: torch.Tensor
    rank: int
    scaling: float = 1.0
    gram: torch.Tensor | None = None
    name: str = "layer"
    quantizer: Quantizer | None = None  # needed by methods that re-quantize (loftq)

    @property
    def error(self) -> torch.Tensor:
        return self.weight - self.quantized


@dataclass
class Initialization:
    """peft's parameters for one layer. Unpacks as ``lora_A, lora_B``.

    quantized: the base weight the adapter goes with (differs from the input only for methods that
    change Q, e.g. loftq); history: the method's objective per iteration, if it iterates.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    quantized: torch.Tensor
    history: list[float] = field(default_factory=list)
    # Set by methods that move Q: the tensor whose quantization gives ``quantized`` bit-exactly, so a
    # quantized base layer can be rebuilt from it with its own quantizer.
    base_weight: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.lora_A, self.lora_B))


Initializer = Callable[..., Initialization]
INITIALIZERS: Registry[Initializer] = Registry("initialization method")


def calibrated(fn: Initializer) -> Initializer:
    """Mark a method whose objective is weighted by the layer's input Gram H (it needs calibration data)."""
    fn.needs_gram = True  # type: ignore[attr-defined]
    return fn


def needs_gram(method: str) -> bool:
    return getattr(INITIALIZERS.get(method, where="init.method"), "needs_gram", False)
