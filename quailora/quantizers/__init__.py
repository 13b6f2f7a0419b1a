"""Quantizers, one module each; importing this package registers every module in it."""

import importlib
import pkgutil

from quailora.quantizers.base import QUANTIZERS, Quantizer

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_quantizer(name: str, **options) -> Quantizer:
    """Build a registered quantizer; options are its constructor's (bits, blocksize, group_size, ...)."""
    return QUANTIZERS.get(name, where="quantizer")(**options)


__all__ = ["QUANTIZERS", "Quantizer", "get_quantizer"]
