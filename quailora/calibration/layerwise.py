"""A causal LM whose modules stay on the meta device; decoder layers are materialized one at a time.

The full-precision model is never resident as a whole: the skeleton is built from the config on
``meta``, the modules before layer 0 are loaded only to compute layer 0's inputs, then each layer is
loaded from the safetensors shards, used and sent back to ``meta``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from quailora.architectures import Layout, ModelWeights, check_causal_lm, meta_model, rebuild_buffers
from quailora.errors import QuailoraInputError


@dataclass
class LayerCall:
    """One calibration batch exactly as the model hands it to a decoder layer: the hidden states plus
    the other arguments the model computed for this batch (masks, position embeddings, alibi, ...).

    ``layer_inputs`` holds the other arguments of the layers that get different ones than layer 0
    (Gemma 2/3 alternate sliding-window and global attention masks and rotary tables)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    layer_inputs: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def run(self, layer: nn.Module) -> torch.Tensor:
        args, kwargs = self.layer_inputs.get(layer, (self.args, self.kwargs))
        out = layer(self.hidden, *args, **kwargs)
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
    if isinstance(value, dict):
        return {k: _reuse_equal(v, kept) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Identical after ``_reuse_equal``: the same kept tensors in the same structure."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class _Caught(Exception):
    """Stops the model's forward once the last layer's inputs are recorded."""


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index`` and records the call the model makes (GPTQ's "catcher").
    Hidden states pass through untouched (only layer 0's are real); the last catcher stops the forward."""

    def __init__(self, layer: nn.Module, index: int, record: Any, last: bool) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.record = record
        self.last = last

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        self.record(self.index, self.layer, hidden, args, kwargs)
        if self.last:
            raise _Caught
        return (hidden,)  # what the model's loop reads with [0], or passes on to the next catcher

    def __getattr__(self, name: str) -> Any:
        # Some models read layer attributes (e.g. attention_type) in their loop.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


class LayerwiseModel:
    """The skeleton of the checkpoint's causal LM, with lazy access to its weights.

    Everything architecture-specific comes from ``quailora.architectures``: the decoder layers, the
    modules that run before layer 0 (every module outside the layers but the output head), the
    non-persistent buffers to rebuild, and the checkpoint's names for the model's tensors.
    """

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
        check_causal_lm(self.config, f"checkpoint {self.checkpoint_dir}")
        self.model = meta_model(self.config)
        self.model.eval()
        self.layout = Layout.of(self.model)
        self.weights = ModelWeights(self.checkpoint_dir, self.layout)
        self.layers: nn.ModuleList = self.model.get_submodule(self.layout.layers_path)
        self._check_checkpoint()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        return self.layout.layer_name(index)

    def _pre_layer_modules(self) -> dict[str, nn.Module]:
        """Modules outside the decoder layers that own tensors, but the output head: what layer 0's
        inputs may depend on (embeddings, positions, their norms, rotary tables)."""
        head = self.model.get_output_embeddings()
        inside = self.layout.layers_path + "."
        return {
            name: module
            for name, module in self.model.named_modules()
            if not name.startswith(inside)
            and name != self.layout.layers_path
            and module is not head
            and any(True for _ in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
        }

    def _check_checkpoint(self) -> None:
        """Every tensor the calibration will load exists with the right shape, checked before any compute."""
        pre_layer = self._pre_layer_modules()
        paths = dict(pre_layer)
        paths.update({self.layer_name(i): self.layers[i] for i in range(self.num_layers)})
        for path, module in paths.items():
            own = module.state_dict()
            if path in pre_layer:  # their children are checked on their own
                own = {k: v for k, v in own.items() if "." not in k}
            for key, tensor in own.items():
                name = f"{path}.{key}"
                if name not in self.weights:
                    raise QuailoraInputError(
                        f"tensor {self.layout.checkpoint_key(name)!r} is missing from checkpoint "
                        f"{str(self.checkpoint_dir)!r}"
                    )
                if self.weights.shape(name) != tuple(tensor.shape):
                    raise QuailoraInputError(
                        f"tensor {self.layout.checkpoint_key(name)!r} in checkpoint {str(self.checkpoint_dir)!r} "
                        f"has shape {self.weights.shape(name)}, the config implies {tuple(tensor.shape)}"
                    )

    def _load(self, path: str, module: nn.Module, recurse: bool = True) -> None:
        rebuild_buffers(self.model, module, self.device, recurse=recurse)
        # Only the tensors the module expects: extra checkpoint tensors (legacy per-layer
        # rotary_emb.inv_freq) are not read.
        keys = [key for key in module.state_dict() if recurse or "." not in key]
        # Read in the stored dtype straight onto the device, converted there, on the reader's thread pool.
        tensors = self.weights.read([f"{path}.{key}" for key in keys], device=self.device, dtype=self.dtype)
        state = {key: tensor for key, (_, tensor) in zip(keys, tensors, strict=True)}
        # assign=True adopts the read tensors instead of copying them into allocated ones: one copy at peak.
        module.load_state_dict(state, strict=False, assign=True)

    @contextmanager
    def _pre_layer_loaded(self) -> Iterator[None]:
        loaded = []
        try:
            for path, module in self._pre_layer_modules().items():
                self._load(path, module, recurse=False)
                loaded.append(module)
            yield
        finally:
            for module in loaded:
                module.to_empty(device="meta", recurse=False)

    @torch.no_grad()
    def capture_inputs(self, input_ids: torch.Tensor, batch_size: int) -> list[LayerCall]:
        """Layer 0's call for each batch of ``input_ids`` (and any other layer's differing arguments),
        computed by the model's own forward."""
        calls: list[LayerCall] = []
        kept: list[torch.Tensor] = []

        def record(index: int, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
            args = _reuse_equal(args, kept)
            kwargs = {k: _reuse_equal(v, kept) for k, v in kwargs.items()}
            if index == 0:
                calls.append(LayerCall(hidden, args, kwargs))
            elif not (_same(args, calls[-1].args) and _same(kwargs, calls[-1].kwargs)):
                calls[-1].layer_inputs[layer] = (args, kwargs)

        originals = list(self.layers)
        for index, layer in enumerate(originals):
            self.layers[index] = _Catcher(layer, index, record, last=index == len(originals) - 1)
        try:
            with self._pre_layer_loaded():
                for batch in input_ids.split(batch_size) if input_ids.numel() else ():
                    with suppress(_Caught):
                        self.model(input_ids=batch.to(self.device), use_cache=False)
        finally:
            for index, layer in enumerate(originals):
                self.layers[index] = layer
        if any(call.hidden.is_meta for call in calls):
            raise RuntimeError(
                f"model_type {self.config.model_type!r}: a module before layer 0 was not loaded"
            )
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
