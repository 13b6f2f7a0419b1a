"""Initialization methods, one module each; importing this package registers every module in it."""

import importlib
import pkgutil

from quailora.initializers.base import (
    INITIALIZERS,
    Initialization,
    Initializer,
    InitProblem,
    base_changing,
    calibrated,
    changes_base,
    needs_gram,
    rebuilt_base,
)

# Adding a method means adding a file here: every module is imported for its @register side effect.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "INITIALIZERS",
    "Initialization",
    "Initializer",
    "InitProblem",
    "base_changing",
    "calibrated",
    "changes_base",
    "needs_gram",
    "rebuilt_base",
]
