"""Quantization-aware LoRA initialization: quantizers, initializers, layer-sharded calibration.

No Ray, no MLflow: this package is the math, usable on its own. Its public names load on first use
(PEP 562), so importing ``quailora.errors`` or ``quailora.registry`` (as the CLI does before it parses
its arguments) does not import torch and bitsandbytes.
"""

import importlib
import logging

# bitsandbytes logs this at import on CPUs with AVX512-BF16: its optional `kernels` package fetches a kernel
# from the Hugging Face hub, which cannot work offline, and bnb then uses its own C++ CPU path (the one every
# test and trial here runs). Only this message is dropped; any other bitsandbytes warning still shows.
_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(_KERNELS_NOTICE)
)

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
