"""Initialization methods, one module each; importing this package registers every module in it."""

import importlib
import pkgutil

from quailora.initializers.base import (
    INITIALIZERS,
    AdapterKind,
    Initialization,
    Initializer,
    InitializerTraits,
    InitProblem,
    adapter_kind,
    changes_base,
    draws_random_numbers,
    method_options,
    needs_gram,
    rebuilt_base,
    register,
    traits,
)

# Adding a method means adding a file here: every module is imported for its @register side effect,
# which also declares the method's traits (adapter kind, needs a Gram, changes the base).
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "draws_random_numbers",
    "method_options",
    "INITIALIZERS",
    "AdapterKind",
    "Initialization",
    "Initializer",
    "InitializerTraits",
    "InitProblem",
    "adapter_kind",
    "changes_base",
    "needs_gram",
    "rebuilt_base",
    "register",
    "traits",
]
