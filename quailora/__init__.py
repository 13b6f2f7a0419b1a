"""Quantization-aware LoRA initialization: quantizers, initializers, layer-sharded calibration.

No Ray, no MLflow: this package is the math, usable on its own. Its public names load on first use
(PEP 562), so importing ``quailora.errors`` or ``quailora.registry`` (as the CLI does before it parses
its arguments) does not import torch and bitsandbytes.
"""

import importlib

_PUBLIC = {
    "initialize": "quailora.api",
    "QuailoraInputError": "quailora.errors",
    "INITIALIZERS": "quailora.initializers",
    "Initialization": "quailora.initializers",
    "needs_gram": "quailora.initializers",
    "QUANTIZER_SPECS": "quailora.quantizers",
    "get_quantizer": "quailora.quantizers",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'quailora' has no attribute {name!r}")
