"""Checkpoint tensors addressed by the model's own state-dict keys, whatever the checkpoint calls them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from quailora.architectures.derive import Layout
from quailora.architectures.experts import FusedSlice
from quailora.checkpoint import SafetensorsWeights
from quailora.errors import QuailoraInputError


class ModelWeights:
    """Lazy reads from a safetensors checkpoint by the prepared model's keys, under the name the checkpoint
    has: the model's own, else transformers' legacy name (Mixtral's ``block_sparse_moe``); a split expert's
    projection is its own tensor where the checkpoint stores experts one by one, else a slice of the fused
    tensor (gpt-oss). Conv1D weights come back as (out, in), like nn.Linear's."""

    def __init__(self, checkpoint_dir: str | Path, layout: Layout | None = None) -> None:
        self.stored = SafetensorsWeights(checkpoint_dir)
        self.layout = layout or Layout.from_config(str(checkpoint_dir))
        self._experts = self.layout.experts()

    def _name(self, key: str) -> str:
        return key if key in self.stored else self.layout.checkpoint_key(key)

    def _key(self, key: str) -> tuple[str, FusedSlice | None]:
        """The stored tensor holding the model's ``key``, and the slice of it that ``key`` is (None: all)."""
        name = self._name(key)
        if name in self.stored:
            return name, None
        module, _, leaf = key.rpartition(".")
        path, _, index_proj = module.rpartition(".")
        path, _, index = path.rpartition(".")
        experts = self._experts.get(path)
        source = experts.source(int(index), index_proj, leaf) if experts and index.isdigit() else None
        if source is None:
            return name, None
        return self._name(f"{path}.{source.param}"), source

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._key(key)[0] in self.stored

    def shape(self, key: str) -> tuple[int, ...]:
        name, part = self._key(key)
        shape = self.stored.shape(name)
        if part is not None:
            return part.shape(shape)
        return shape[::-1] if self.layout.stored_transposed(key) else shape

    def locate(self, key: str) -> tuple[str, Path, bool]:
        """Where the model's ``key`` lies in the checkpoint: its stored name, its file, and whether it is
        stored transposed (a Conv1D weight)."""
        name, part = self._key(key)
        if part is not None:
            raise QuailoraInputError(f"{key!r} is a slice of the checkpoint's fused tensor {name!r}")
        name, path = self.stored.stored_key(name)
        return name, path, self.layout.stored_transposed(key)

    def get(
        self,
        key: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        threads: int | None = None,
    ) -> torch.Tensor:
        """The model's ``key`` as SafetensorsWeights.get reads it: in its stored dtype onto ``device``, converted
        there to ``dtype`` (None: the stored dtype)."""
        return dict(self.read([key], device=device, dtype=dtype, threads=threads))[key]

    def read(
        self,
        keys: Iterable[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        threads: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for each of the model's ``keys``, in order, read ahead in parallel with a bounded
        number in flight (SafetensorsWeights.read). A fused experts tensor is read once per call and kept
        until its last slice is handed out."""
        sources = [(key, *self._key(key)) for key in keys]
        names = list(
            dict.fromkeys(name for _, name, _ in sources)
        )  # each stored tensor once, first use first
        last = {name: i for i, (_, name, _) in enumerate(sources)}
        stored = self.stored.read(names, device=device, dtype=dtype, threads=threads)
        held: dict[str, torch.Tensor] = {}
        for i, (key, name, part) in enumerate(sources):
            while name not in held:
                read, tensor = next(stored)
                held[read] = tensor
            tensor = held.pop(name) if last[name] == i else held[name]
            if part is not None:
                yield key, part(tensor)
            else:
                yield key, tensor.T.contiguous() if self.layout.stored_transposed(key) else tensor
