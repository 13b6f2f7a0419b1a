"""Quantizers, one package per backend; importing this package registers every backend's specs.

Light: only the specs (quailora.quantizers.spec) load here; a backend's torch and bitsandbytes code
loads when ``get_quantizer`` or a spec's ``backend()`` first needs it.
"""

import importlib
import pkgutil

from quailora.quantizers.base import Quantizer
from quailora.quantizers.spec import QUANTIZER_SPECS, QuantizerSpec, quantizer_spec

# Adding a quantizer means adding a backend package here: each registers its QuantizerSpecs on import.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.ispkg:
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_quantizer(name: str, **options) -> Quantizer:
    """Build a registered quantizer; options are its constructor's (bits, blocksize, group_size, ...)."""
    return quantizer_spec(name, where="quantizer").backend().quantizer(**options)


__all__ = ["QUANTIZER_SPECS", "Quantizer", "QuantizerSpec", "get_quantizer", "quantizer_spec"]
