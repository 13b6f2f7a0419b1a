"""What a quantizer backend does to models, one QuantBackend per registered QuantizerSpec.

Types only (torch is imported for type checkers), so the spec registry stays light; each backend package's
``backend`` module builds its objects and is imported when a spec's ``backend()`` is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quailora.quantizers.base import Quantizer, QuantSettings


@dataclass(frozen=True)
class BaseLayerKind:
    """What initialization needs from one frozen base-layer type. dequantize(layer): Q exactly as the
    forward pass uses it; quantizer(layer): a Quantizer with the layer's own settings, None for a layer
    that carries none (methods that re-quantize need it); requantize(layer, W'): store quant(W') in place."""

    dequantize: Callable[[nn.Module], torch.Tensor]
    quantizer: Callable[[nn.Module], Quantizer | None]
    requantize: Callable[[nn.Module, torch.Tensor], None]


@dataclass(frozen=True)
class QuantBackend:
    """quantizer(**options): the fake-quantizer (options: QuantizerSpec.options). load(checkpoint, settings,
    dtype, device, float_storage): the checkpoint quantized while loading; float_storage keeps packed codes
    in the float dtype, so ZeRO-3 can partition them. quantize_linear(linear, settings): one layer, as
    load makes it. save / load_saved: the quantized model in a form that loads without quantizing again
    (the quantize stage's cache entry); save_stock: the form stock transformers loads (export).
    layers: the base-layer types it makes, with what initialization needs of each. check(settings):
    settings the loader cannot honour, raised before loading. storage(settings, dtype, float_storage):
    what else shapes the stored weights (a stage-cache key)."""

    name: str
    quantizer: Callable[..., Quantizer]
    load: Callable[[Path, QuantSettings, torch.dtype, torch.device, bool], nn.Module]
    quantize_linear: Callable[[nn.Linear, QuantSettings], nn.Module]
    save: Callable[[nn.Module, Path], None]
    load_saved: Callable[[Path, torch.dtype, torch.device], nn.Module]
    save_stock: Callable[[nn.Module, Path], None]
    layers: dict[type, BaseLayerKind]
    check: Callable[[QuantSettings], None] = lambda settings: None
    storage: Callable[[QuantSettings, torch.dtype, bool], dict] = lambda settings, dtype, float_storage: {}
