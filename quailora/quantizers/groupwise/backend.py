"""Group-wise INT-k models: GroupwiseLinear base layers, loaded straight from a checkpoint one weight at a
time, cached in quailora's own packed format, exported as compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quailora.quantizers.backend import BaseLayerKind, QuantBackend
from quailora.quantizers.base import QuantSettings
from quailora.quantizers.groupwise.codes import GroupwiseIntQuantizer
from quailora.quantizers.groupwise.layer import GroupwiseLinear
from quailora.quantizers.groupwise.loading import load_groupwise_model
from quailora.quantizers.groupwise.packed import load_packed, save_packed


def _load(
    checkpoint: Path, settings: QuantSettings, dtype: torch.dtype, device: torch.device, float_storage: bool
) -> nn.Module:
    # Every linear layer but the head, whatever LoRA targets: the same coverage as bitsandbytes loading.
    # Quantized one weight at a time on the device: no full-precision copy of the model anywhere. Codes,
    # scales and zeros are integer buffers whatever float_storage says, which ZeRO-3 leaves whole.
    return load_groupwise_model(checkpoint, settings.bits, settings.group_size, dtype=dtype, device=device)


def _requantize(layer: GroupwiseLinear, weight: torch.Tensor) -> None:
    q = GroupwiseIntQuantizer(layer.bits, layer.group_size).quantize(weight)
    layer.qweight.copy_(q.codes)
    layer.scale_values().copy_(q.scales)
    layer.zero_values().copy_(q.zeros)


def _save_stock(model: nn.Module, out: Path) -> None:
    # compressed-tensors: only export needs it
    from quailora.quantizers.groupwise.compressed import save_compressed

    save_compressed(model, out)


INT = QuantBackend(
    name="int",
    quantizer=GroupwiseIntQuantizer,
    load=_load,
    quantize_linear=lambda linear, settings: GroupwiseLinear.from_linear(
        linear, settings.bits, settings.group_size
    ),
    save=save_packed,  # packed codes, scales and zeros of every GroupwiseLinear, plus its manifest
    load_saved=lambda saved, dtype, device: load_packed(saved).to(device),
    save_stock=_save_stock,
    layers={
        GroupwiseLinear: BaseLayerKind(
            dequantize=lambda layer: layer.dequantize(),
            quantizer=lambda layer: GroupwiseIntQuantizer(layer.bits, layer.group_size),
            requantize=_requantize,
        )
    },
)
