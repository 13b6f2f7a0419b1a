"""Lazy, one-tensor-at-a-time reads from a (sharded) safetensors checkpoint.

Calibration materializes one decoder layer at a time, so nothing here may load a whole shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from quailora.errors import QuailoraInputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsWeights:
    """Tensor name -> shard file map of a checkpoint directory; tensors are read on demand as float32."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._file_of = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, Path]:
        index = self.checkpoint_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise QuailoraInputError(
                    f"checkpoint index {index} is not a safetensors index: {err}"
                ) from None
            file_of = {name: self.checkpoint_dir / shard for name, shard in weight_map.items()}
            missing = sorted({str(path) for path in file_of.values() if not path.is_file()})
            if missing:
                raise QuailoraInputError(f"checkpoint index {str(index)!r} names missing shard(s) {missing}")
            return file_of
        single = self.checkpoint_dir / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        raise QuailoraInputError(
            f"checkpoint_dir {str(self.checkpoint_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}"
        )

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def _resolve(self, name: str) -> str | None:
        """The stored key for a model key. Checkpoints saved from the bare base model (e.g. bigscience's
        BLOOM) lack the causal-LM wrapper's prefix ("transformer.", "model."), as transformers tolerates."""
        if name in self._file_of:
            return name
        bare = name.partition(".")[2]
        return bare if bare in self._file_of else None

    def _file(self, name: str) -> tuple[str, Path]:
        key = self._resolve(name)
        if key is None:
            raise QuailoraInputError(f"tensor {name!r} is not in checkpoint {str(self.checkpoint_dir)!r}")
        return key, self._file_of[key]

    def stored_key(self, name: str) -> tuple[str, Path]:
        """The key a model tensor has in the checkpoint, and the file holding it."""
        return self._file(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        key, path = self._file(name)
        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor as a float32 copy: safetensors hands out views of the memory-mapped file."""
        key, path = self._file(name)
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key).to(torch.float32, copy=True)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (a module path), keyed relative to it, as ``load_state_dict`` wants.

        Read one by one through ``get``, so the file's mapped pages are released after each tensor and
        the peak stays at one copy of the module plus one tensor.
        """
        module = prefix.rstrip(".")
        for prefix in (
            module + ".",
            module.partition(".")[2] + ".",
        ):  # the second: a bare base-model checkpoint
            names = [name for name in self._file_of if name.startswith(prefix)] if prefix != "." else []
            if names:
                break
        else:
            raise QuailoraInputError(f"no tensor under {module!r} in checkpoint {str(self.checkpoint_dir)!r}")
        return {name[len(prefix) :]: self.get(name) for name in names}


BIN_INDEX_FILE = "pytorch_model.bin.index.json"
SINGLE_BIN_FILE = "pytorch_model.bin"


def has_safetensors(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / SINGLE_FILE).is_file() or (checkpoint_dir / INDEX_FILE).is_file()


def bin_shards(checkpoint_dir: Path) -> list[str]:
    """The pickled PyTorch shards of a ``.bin``-only checkpoint (empty when there are none)."""
    index = checkpoint_dir / BIN_INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [SINGLE_BIN_FILE] if (checkpoint_dir / SINGLE_BIN_FILE).is_file() else []


def convert_bin_checkpoint(src: Path, out: Path) -> None:
    """Write ``src``'s ``.bin`` shards as safetensors shards (same tensor names) plus its other files to ``out``.

    Shard by shard, so the peak is one shard. Tensors sharing storage (tied embeddings) are cloned:
    safetensors stores each tensor on its own.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards = bin_shards(src)
    weight_map: dict[str, str] = {}
    for shard in shards:
        state = torch.load(src / shard, map_location="cpu", weights_only=True, mmap=True)
        name = shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file(
            {k: t.contiguous().clone() for k, t in state.items()}, out / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(state, name))
        del state
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for path in src.iterdir():
        if path.is_file() and path.name not in (*shards, BIN_INDEX_FILE):
            (out / path.name).write_bytes(path.read_bytes())
