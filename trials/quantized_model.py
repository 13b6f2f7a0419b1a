"""Load a checkpoint quantized the way a trial asks, through the backend its quant.method names
(quailora.quantizers: one home per quantizer, holding loading, saving and its fake-quantizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from quailora.architectures import meta_model
from quailora.architectures.experts import is_fused_experts
from quailora.quantizers import quantizer_spec
from quailora.quantizers.backend import QuantBackend
from quailora.quantizers.base import Quantizer
from trials.config import QuantSpec, TrialConfig


def _backend(spec: QuantSpec) -> QuantBackend:
    return quantizer_spec(spec.method).backend()


def _float_storage(config: TrialConfig) -> bool:
    """ZeRO-3 partitions every parameter, packed quantized codes included."""
    return config.train.zero_stage == 3


def check_quantization(spec: QuantSpec) -> None:
    """Every quantizer setting the backend cannot honour, as a clear error before loading anything."""
    _backend(spec).check(spec)
    quantizer_for(spec)  # the quantizer's own checks (bits, block and group sizes)


def quantizer_options(spec: QuantSpec) -> dict:
    """The quantizer's name and the settings it uses (the others, e.g. a 4-bit quantizer's group_size, not)."""
    return {"method": spec.method, **quantizer_spec(spec.method).options(spec)}


def storage_options(config: TrialConfig, dtype: torch.dtype) -> dict:
    """Everything that decides the stored quantized weights: the quantizer's settings and its storage."""
    storage = _backend(config.quant).storage(config.quant, dtype, _float_storage(config))
    return {**quantizer_options(config.quant), **storage}


def quantizer_for(spec: QuantSpec) -> Quantizer:
    """The fake-quantizer matching the loaded layers (for calibration with quantized propagation)."""
    return _backend(spec).quantizer(**quantizer_spec(spec.method).options(spec))


def serialized_size_mb(model: nn.Module) -> float:
    """Size of the model's weights as saved: its state_dict carries bitsandbytes' absmax, quant maps and
    SCB and the group-wise layers' codes, scales and zeros, which parameter counts alone miss."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:  # tied weights (embeddings and head) are stored once
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total / 2**20


def load_quantized_model(
    checkpoint: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The checkpoint quantized as ``quant`` asks, with every projection an nn.Linear-like layer of
    weight (out, in) (quailora.architectures.prepare: GPT-2's Conv1D, fused MoE experts)."""
    return _backend(config.quant).load(checkpoint, config.quant, dtype, device, _float_storage(config))


def has_stock_quantized_form(model_config: PretrainedConfig) -> bool:
    """Whether the quantized model keeps transformers' own module structure, so its saved form loads back
    through stock loading: no Conv1D, no fused experts, every linear exactly nn.Linear. The others
    (GPT-2, MoE, Falcon) are restructured after loading (quailora.architectures.prepare), which no saved
    checkpoint reproduces, so their quantize stage runs in every trial."""
    for module in meta_model(model_config).modules():
        if isinstance(module, Conv1D) or is_fused_experts(module):
            return False
        if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
            return False
    return True


def save_quantized_model(model: nn.Module, config: TrialConfig, out: Path) -> None:
    _backend(config.quant).save(model, out)


def load_saved_quantized_model(
    saved: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    return _backend(config.quant).load_saved(saved, dtype, device)
