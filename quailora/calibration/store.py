"""Grams on disk: one safetensors file per decoder layer plus a JSON index that any process can reopen.

Memory stays bounded because a layer's Grams are written as soon as the layer is done.
"""

from __future__ import annotations

import json
import math
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


MIRROR_BLOCK = 1024  # rows of the square blocks unpack_gram mirrors at a time


def pack_gram(gram: torch.Tensor) -> torch.Tensor:
    """H's upper triangle, row by row: H is symmetric, so this is all of it at about half the bytes (a Gram
    of LLaMA-30B's MLP input: 1.28 GB instead of 2.57 GB). Stored in fp32: half precision changed the
    calibrated objective by far more than 1e-3 (benchmarks/gram_precision.py, docs/results/scale.md).
    Copied row by row by hand: torch.triu_indices would hold 2 x n(n+1)/2 int64 indices, twice the Gram."""
    n = gram.shape[0]
    packed = torch.empty(n * (n + 1) // 2, dtype=gram.dtype, device=gram.device)
    start = 0
    for row in range(n):
        packed[start : start + n - row] = gram[row, row:]
        start += n - row
    return packed


def unpack_gram(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric H from pack_gram's upper triangle (its lower triangle mirrored), holding nothing but H
    beside ``packed``: rows are copied back one by one and the lower triangle is filled in square blocks."""
    n = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    gram = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    start = 0
    for row in range(n):
        gram[row, row:] = packed[start : start + n - row]
        start += n - row
    for i in range(0, n, MIRROR_BLOCK):
        diagonal = gram[i : i + MIRROR_BLOCK, i : i + MIRROR_BLOCK]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        for j in range(i + MIRROR_BLOCK, n, MIRROR_BLOCK):
            gram[j : j + MIRROR_BLOCK, i : i + MIRROR_BLOCK] = gram[
                i : i + MIRROR_BLOCK, j : j + MIRROR_BLOCK
            ].T
    return gram


def write_layer(out_dir: Path, layer: int, grams: dict[str, torch.Tensor]) -> str:
    """Consumes ``grams``: each full Gram is dropped once packed, so writing a layer holds its packed Grams and
    one full one (safetensors writes from the tensors' memory, no serialized copy)."""
    name = layer_file(layer)
    packed = {key: pack_gram(grams.pop(key)) for key in list(grams)}
    save_file(packed, out_dir / name, metadata={"layer": str(layer)})
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
        self._last: tuple[tuple[int, str], torch.Tensor] | None = None
        self.reads = 0  # Grams read from disk so far

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.index["layers"])

    def names(self, layer: int | None = None) -> list[str]:
        """Module names with a Gram, optionally only those of one decoder layer."""
        return sorted(
            n
            for n, m in self._modules.items()
            if m["gram"] is not None and (layer is None or m["layer"] == layer)
        )

    def _entry(self, module_name: str) -> dict[str, Any]:
        try:
            return self._modules[module_name]
        except KeyError:
            raise QuailoraInputError(
                f"module {module_name!r} has no Gram in {str(self.out_dir)!r} (e.g. {self.names()[:3]})"
            ) from None

    def tokens(self, module_name: str) -> int | None:
        """How many calibration tokens reached the module (a MoE expert: those routed to it; 0: none, and it
        has no Gram); None where the store predates per-module counts."""
        return self._entry(module_name).get("tokens")

    def shared_key(self, module_name: str) -> str:
        """The module whose input this one shares (itself if none); equal keys mean one stored Gram."""
        return self._entry(module_name)["gram"]

    def get(self, module_name: str) -> torch.Tensor:
        """H = XᵀX / N (in x in, float32) of the module's input. Modules that share an input (q, k, v) are
        solved one after the other: the last Gram read is kept, so each shared Gram is read once. Callers
        must not change it in place."""
        entry = self._entry(module_name)
        key = (entry["layer"], entry["gram"])
        if self._last is None or self._last[0] != key:
            path = self.out_dir / self.index["layers"][str(entry["layer"])]
            with safe_open(path, framework="pt") as f:
                stored = f.get_tensor(entry["gram"]).to(torch.float32)
            self._last = (
                key,
                unpack_gram(stored) if stored.dim() == 1 else stored,
            )  # 2-D: written before packing
            self.reads += 1
        return self._last[1]
