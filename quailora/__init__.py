"""Quantization-aware LoRA initialization: quantizers, initializers, layer-sharded calibration.

No Ray, no MLflow: this package is the math, usable on its own.
"""

from quailora.api import initialize
from quailora.errors import QuailoraInputError
from quailora.initializers import INITIALIZERS, Initialization, needs_gram
from quailora.quantizers import QUANTIZERS, get_quantizer

__all__ = [
    "INITIALIZERS",
    "QUANTIZERS",
    "Initialization",
    "QuailoraInputError",
    "get_quantizer",
    "initialize",
    "needs_gram",
]
