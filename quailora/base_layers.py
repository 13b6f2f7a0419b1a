"""What initialization needs from each kind of frozen base layer: every quantizer backend declares the
layer types it makes (QuantBackend.layers); a plain nn.Linear is the fallback."""

from __future__ import annotations

import functools

import torch
from torch import nn

from quailora.errors import QuailoraInputError
from quailora.quantizers import QUANTIZER_SPECS
from quailora.quantizers.backend import BaseLayerKind


def _linear_requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))


# A plain Linear holds an already fake-quantized (or full-precision) weight: Q is the weight itself.
PLAIN_LINEAR = BaseLayerKind(
    dequantize=lambda layer: layer.weight.detach().to(torch.float32),
    quantizer=lambda layer: None,
    requantize=_linear_requantize,
)


@functools.cache
def base_layers() -> dict[type, BaseLayerKind]:
    """Every registered backend's layer types (importing each backend once), then nn.Linear."""
    kinds = {}
    for name in QUANTIZER_SPECS:
        kinds.update(QUANTIZER_SPECS.get(name).backend().layers)
    return {**kinds, nn.Linear: PLAIN_LINEAR}


def base_layer_kind(layer: nn.Module, name: str = "layer") -> BaseLayerKind:
    # Most specific registered class first (bnb layers subclass nn.Linear).
    kinds = base_layers()
    for cls in type(layer).__mro__:
        if cls in kinds:
            return kinds[cls]
    raise QuailoraInputError(
        f"layer {name}: base layer type {type(layer).__name__} is not supported; "
        f"supported: {sorted(c.__name__ for c in kinds)}"
    )


def eval_path(device: torch.device, dtype: torch.dtype) -> str:
    """How the quantized base layers compute a trial's forwards (evaluation and training), e.g.
    ``cuda-bfloat16``: on ``device``, with each layer's Q rounded to ``dtype`` before the matmul
    (bitsandbytes 4-bit on CUDA, or on CPU once exact_cpu_4bit turned its bf16 kernel off; GroupwiseLinear).
    ``float32`` computes with the very Q initialization solved against; bf16/fp16 round it, so one config
    evaluated on two paths gives slightly different perplexities."""
    return f"{device.type}-{str(dtype).removeprefix('torch.')}"
