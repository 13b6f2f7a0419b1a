"""A causal LM whose modules stay on the meta device; decoder layers are materialized one at a time.

The full-precision model is never resident as a whole: the skeleton is built from the config on
``meta``, the modules before layer 0 are loaded only to compute layer 0's inputs, then each layer is
loaded from the safetensors shards, used and sent back to ``meta``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quailora.calibration.families import FAMILIES, Family
from quailora.checkpoint import SafetensorsWeights
from quailora.errors import QuailoraInputError


@dataclass
class LayerCall:
    """One calibration batch exactly as the model hands it to a decoder layer: the hidden states plus
    the other arguments the model computed for this batch (masks, position embeddings, alibi, ...)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, layer: nn.Module) -> torch.Tensor:
        out = layer(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out  # bloom returns a tuple, llama a tensor


def _reuse_equal(value: Any, kept: list[torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by an equal one already kept, if any. Batches of one size get
    identical masks, positions and alibi; one copy each is enough (bloom's 4-D mask for 8 x 2048 tokens
    is 32 MiB per batch)."""
    if isinstance(value, torch.Tensor):
        for old in kept:
            if old.shape == value.shape and old.dtype == value.dtype and torch.equal(old, value):
                return old
        kept.append(value)
        return value
    if isinstance(value, tuple):
        return tuple(_reuse_equal(v, kept) for v in value)
    return value


class _Caught(Exception):
    """Stops the model's forward once layer 0's inputs are recorded."""


class _Catcher(nn.Module):
    """Stands in for layer 0, records its call and stops the forward (GPTQ's "catcher")."""

    def __init__(self, layer: nn.Module, calls: list[LayerCall]) -> None:
        super().__init__()
        self.layer = layer
        self.calls = calls
        self.kept: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        args = _reuse_equal(args, self.kept)
        kwargs = {k: _reuse_equal(v, self.kept) for k, v in kwargs.items()}
        self.calls.append(LayerCall(hidden, args, kwargs))
        raise _Caught

    def __getattr__(self, name: str) -> Any:
        # Some models read layer attributes (e.g. attention_type) in their loop.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


class LayerwiseModel:
    """The skeleton of the checkpoint's causal LM, with lazy access to its weights."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``device``/``dtype``: where and in which precision the loaded layers compute (a GPU forward
        runs in the model dtype; the Grams are accumulated in their own precision)."""
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        if not (self.checkpoint_dir / "config.json").is_file():
            raise QuailoraInputError(f"checkpoint_dir {str(self.checkpoint_dir)!r} has no config.json")
        self.config = AutoConfig.from_pretrained(self.checkpoint_dir)
        self.family: Family = FAMILIES.get(self.config.model_type, where=f"checkpoint {self.checkpoint_dir}")
        self.weights = SafetensorsWeights(self.checkpoint_dir)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        self.model.eval()
        self.layers: nn.ModuleList = self.model.get_submodule(self.family.layers)
        prefix = self.model.base_model_prefix + "."
        # Checkpoints saved from the bare base model (e.g. bigscience/bloom-*) lack its prefix.
        self._strip = prefix if not any(k.startswith(prefix) for k in self.weights) else ""
        self._check_checkpoint()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        return f"{self.family.layers}.{index}"

    def _stored_name(self, module_path: str) -> str:
        return module_path.removeprefix(self._strip)

    def _submodule(self, path: str) -> nn.Module | None:
        parent, _, child = path.rpartition(".")
        return getattr(self.model.get_submodule(parent), child, None)

    def _check_checkpoint(self) -> None:
        """Every tensor the calibration will load exists with the right shape, checked before any compute."""
        paths = [p for p in self.family.pre_layer if self._submodule(p) is not None]
        paths += [self.layer_name(i) for i in range(self.num_layers)]
        for path in paths:
            module = self.model.get_submodule(path)
            for sub, child in module.named_modules():
                if child._non_persistent_buffers_set:
                    raise NotImplementedError(f"{path}.{sub} has buffers that are not in the checkpoint")
            for key, tensor in module.state_dict().items():
                name = self._stored_name(f"{path}.{key}")
                if name not in self.weights:
                    raise QuailoraInputError(
                        f"tensor {name!r} is missing from checkpoint {str(self.checkpoint_dir)!r}"
                    )
                if self.weights.shape(name) != tuple(tensor.shape):
                    raise QuailoraInputError(
                        f"tensor {name!r} in checkpoint {str(self.checkpoint_dir)!r} has shape "
                        f"{self.weights.shape(name)}, the config implies {tuple(tensor.shape)}"
                    )

    def _load(self, path: str, module: nn.Module) -> None:
        # assign=True adopts the read tensors instead of copying them into allocated ones: one copy at peak.
        state = {
            key: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
            for key, t in self.weights.state_dict(self._stored_name(path)).items()
        }
        module.load_state_dict(state, strict=True, assign=True)

    @contextmanager
    def _pre_layer_loaded(self) -> Iterator[None]:
        loaded = []
        try:
            for path in self.family.pre_layer:
                module = self._submodule(path)
                if module is not None:
                    self._load(path, module)
                    loaded.append(module)
            for path in self.family.rebuilt:
                parent, _, child = path.rpartition(".")
                with self.device:
                    fresh = type(self._submodule(path))(config=self.config)
                setattr(self.model.get_submodule(parent), child, fresh)
                loaded.append(fresh)
            yield
        finally:
            for module in loaded:
                module.to_empty(device="meta")

    @torch.no_grad()
    def capture_inputs(self, input_ids: torch.Tensor, batch_size: int) -> list[LayerCall]:
        """Layer 0's call for each batch of ``input_ids``, computed by the model's own forward."""
        calls: list[LayerCall] = []
        catcher = _Catcher(self.layers[0], calls)
        self.layers[0] = catcher
        try:
            with self._pre_layer_loaded():
                for batch in input_ids.split(batch_size) if input_ids.numel() else ():
                    with suppress(_Caught):
                        self.model(input_ids=batch.to(self.device), use_cache=False)
        finally:
            self.layers[0] = catcher.layer
        if any(call.hidden.is_meta for call in calls):
            raise RuntimeError(f"family {self.config.model_type!r}: a module before layer 0 was not loaded")
        return calls

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` loaded on the model's device and dtype, freed (back to meta) on exit."""
        module = self.layers[index]
        self._load(self.layer_name(index), module)
        try:
            yield module
        finally:
            module.to_empty(device="meta")
