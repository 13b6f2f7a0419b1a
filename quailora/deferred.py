"""torch for the modules the method registry imports, loaded at its first attribute use.

`quailora plan` reads the initializer registry (method names, which methods calibrate) for every sweep,
but runs no method: importing torch there would be most of its start-up time. The registry's modules
(initializers, linalg, QA-LoRA pooling) import ``torch`` from here; type checkers see the real module.
"""

from __future__ import annotations

import importlib
from typing import Any


class DeferredModule:
    """Stands in for a module until an attribute is read, then forwards every read to the imported module."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


torch = DeferredModule("torch")
