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
    effective_init_options,
    method_options,
    needs_gram,
    rebuilt_base,
    register,
    traits,
    zero_product,
)
from quailora.initializers.options import MethodOptions, SeededOptions, SvdOptions

# Adding a method means adding a file here: every module is imported for its @register side effect,
# which also declares the method's traits (adapter kind, needs a Gram, changes the base) and its options
# dataclass (names, defaults, domains, whether they draw random numbers).
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "options"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "draws_random_numbers",
    "effective_init_options",
    "method_options",
    "MethodOptions",
    "SeededOptions",
    "SvdOptions",
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
    "zero_product",
]
