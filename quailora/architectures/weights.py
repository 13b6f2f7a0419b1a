"""Checkpoint tensors addressed by the model's own state-dict keys, whatever the checkpoint calls them."""

from __future__ import annotations

from pathlib import Path

import torch

from quailora.architectures.derive import Layout
from quailora.checkpoint import SafetensorsWeights


class ModelWeights:
    """Lazy reads from a safetensors checkpoint by the prepared model's keys: legacy names are mapped
    (Architecture.checkpoint_renames) and Conv1D weights come back as (out, in), like nn.Linear's."""

    def __init__(self, checkpoint_dir: str | Path, layout: Layout | None = None) -> None:
        self.stored = SafetensorsWeights(checkpoint_dir)
        self.layout = layout or Layout.from_config(str(checkpoint_dir))

    def _key(self, key: str) -> str:
        return self.layout.checkpoint_key(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._key(key) in self.stored

    def shape(self, key: str) -> tuple[int, ...]:
        shape = self.stored.shape(self._key(key))
        return shape[::-1] if self.layout.stored_transposed(key) else shape

    def locate(self, key: str) -> tuple[str, Path, bool]:
        """Where the model's ``key`` lies in the checkpoint: its stored name, its file, and whether it is
        stored transposed (a Conv1D weight)."""
        name, path = self.stored.stored_key(self._key(key))
        return name, path, self.layout.stored_transposed(key)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.stored.get(self._key(key))
        return tensor.T.contiguous() if self.layout.stored_transposed(key) else tensor
