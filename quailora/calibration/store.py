"""Grams on disk: one safetensors file per decoder layer plus a JSON index that any process can reopen.

Memory stays bounded because a layer's Grams are written as soon as the layer is done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quailora.errors import QuailoraInputError

INDEX = "grams.index.json"


def layer_file(layer: int) -> str:
    return f"grams.layer{layer:05d}.safetensors"


def write_layer(out_dir: Path, layer: int, grams: dict[str, torch.Tensor]) -> str:
    name = layer_file(layer)
    save_file({k: v.contiguous() for k, v in grams.items()}, out_dir / name, metadata={"layer": str(layer)})
    return name


def write_index(out_dir: Path, index: dict[str, Any]) -> None:
    """Atomic, so a reader never sees a half-written index."""
    tmp = out_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / INDEX)


class GramStore:
    """Read access to the Grams written by ``collect_grams``; cheap to open, reads one Gram at a time."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        index = self.out_dir / INDEX
        if not index.is_file():
            raise QuailoraInputError(f"gram directory {str(self.out_dir)!r} has no {INDEX}")
        self.index: dict[str, Any] = json.loads(index.read_text())
        self._modules: dict[str, dict[str, Any]] = self.index["modules"]

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.index["layers"])

    def names(self, layer: int | None = None) -> list[str]:
        """Module names with a Gram, optionally only those of one decoder layer."""
        return sorted(n for n, m in self._modules.items() if layer is None or m["layer"] == layer)

    def _entry(self, module_name: str) -> dict[str, Any]:
        try:
            return self._modules[module_name]
        except KeyError:
            raise QuailoraInputError(
                f"module {module_name!r} has no Gram in {str(self.out_dir)!r} (e.g. {self.names()[:3]})"
            ) from None

    def shared_key(self, module_name: str) -> str:
        """The module whose input this one shares (itself if none); equal keys mean one stored Gram."""
        return self._entry(module_name)["gram"]

    def get(self, module_name: str) -> torch.Tensor:
        """H = XᵀX / N (in x in, float32) of the module's input."""
        entry = self._entry(module_name)
        path = self.out_dir / self.index["layers"][str(entry["layer"])]
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(entry["gram"]).to(torch.float32, copy=True)
