"""Load a checkpoint quantized the way a trial asks: one backend per quantizer name, found in QUANT_BACKENDS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from quailora.architectures import Layout, meta_model, prepare
from quailora.architectures.experts import is_fused_experts
from quailora.base_layers import quantize_bnb
from quailora.errors import QuailoraInputError
from quailora.qalora.loading import load_groupwise_model
from quailora.qalora.merge import load_merged, save_merged
from quailora.quantizers import get_quantizer
from quailora.quantizers.base import Quantizer
from quailora.registry import Registry
from trials.config import QuantSpec, TrialConfig

# transformers 5 builds bnb 4-bit layers with bitsandbytes' default block size; it cannot be chosen.
BNB_4BIT_BLOCKSIZE = 64


@dataclass(frozen=True)
class QuantBackend:
    """load: quantize a full-precision checkpoint while loading it. save / load_saved: the quantized model
    in a format that loads without quantizing again (the quantize stage's cache entry)."""

    load: Callable[[Path, TrialConfig, torch.dtype, torch.device], nn.Module]
    quantizer_options: Callable[[QuantSpec], dict]
    save: Callable[[nn.Module, Path], None]
    load_saved: Callable[[Path, torch.dtype, torch.device], nn.Module]
    check: Callable[[QuantSpec], None] = lambda spec: None
    # What else shapes the stored weights, beyond the quantizer (bnb 4-bit: the packed storage dtype).
    storage: Callable[[TrialConfig, torch.dtype], dict] = lambda config, dtype: {}


QUANT_BACKENDS: Registry[QuantBackend] = Registry("quantizer")


def _device_map(device: torch.device) -> dict[str, str]:
    return {"": str(device)}


def _check_bnb_4bit(spec: QuantSpec) -> None:
    if spec.blocksize != BNB_4BIT_BLOCKSIZE:
        raise QuailoraInputError(
            f"quant.blocksize={spec.blocksize}: transformers' bitsandbytes 4-bit loading only uses {BNB_4BIT_BLOCKSIZE}"
        )


def _prepared(model: nn.Module) -> nn.Module:
    prepare(model)
    return model


def _bnb_4bit_storage(config: TrialConfig, dtype: torch.dtype) -> torch.dtype:
    # ZeRO-3 partitions every parameter: transformers' DeepSpeed guide says to store the packed 4-bit
    # weights in the model's float dtype so they can be sharded and gathered like the others.
    return dtype if config.train.zero_stage == 3 else torch.uint8


def _load_bnb_4bit(
    checkpoint: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant.method,
        bnb_4bit_use_double_quant=config.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=_bnb_4bit_storage(config, dtype),
    )
    return _prepared(
        AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, dtype=dtype, device_map=_device_map(device)
        )
    )


def _save_bnb(model: nn.Module, out: Path) -> None:
    """transformers' bitsandbytes serialization: packed codes and quant states, config.json says how."""
    model.save_pretrained(out, safe_serialization=True)


def _load_saved_bnb(saved: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, device_map=_device_map(device))


def _load_bnb_8bit(
    checkpoint: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    return _prepared(
        AutoModelForCausalLM.from_pretrained(
            checkpoint,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            dtype=dtype,
            device_map=_device_map(device),
        )
    )


def _load_groupwise(
    checkpoint: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    # Every linear layer but the head, whatever LoRA targets: the same coverage as bitsandbytes loading.
    # Quantized one weight at a time on the device: no full-precision copy of the model anywhere.
    return load_groupwise_model(
        checkpoint, config.quant.bits, config.quant.group_size, dtype=dtype, device=device
    )


def _save_groupwise(model: nn.Module, out: Path) -> None:
    save_merged(model, out)  # packed codes, scales and zeros of every GroupwiseLinear, plus its manifest


def _load_saved_groupwise(saved: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return load_merged(saved).to(device)


def _bnb_4bit_options(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "blocksize": spec.blocksize, "double_quant": spec.double_quant}


for _name in ("nf4", "fp4"):
    QUANT_BACKENDS.register(_name)(
        QuantBackend(
            _load_bnb_4bit,
            _bnb_4bit_options,
            _save_bnb,
            _load_saved_bnb,
            _check_bnb_4bit,
            lambda config, dtype: {"quant_storage": str(_bnb_4bit_storage(config, dtype))},
        )
    )
QUANT_BACKENDS.register("int8")(
    QuantBackend(_load_bnb_8bit, lambda spec: {"bits": spec.bits}, _save_bnb, _load_saved_bnb)
)
QUANT_BACKENDS.register("int")(
    QuantBackend(
        _load_groupwise,
        lambda spec: {"bits": spec.bits, "group_size": spec.group_size},
        _save_groupwise,
        _load_saved_groupwise,
    )
)


def check_quantization(spec: QuantSpec) -> None:
    """Every quantizer setting the backend cannot honour, as a clear error before loading anything."""
    backend = QUANT_BACKENDS.get(spec.method, where="quant.method")
    backend.check(spec)
    quantizer_for(spec)  # the quantizer's own checks (bits, block and group sizes)


def quantizer_options(spec: QuantSpec) -> dict:
    """The quantizer's name and the settings it uses (the others, e.g. a 4-bit quantizer's group_size, not)."""
    return {"method": spec.method, **QUANT_BACKENDS.get(spec.method).quantizer_options(spec)}


def storage_options(config: TrialConfig, dtype: torch.dtype) -> dict:
    """Everything that decides the stored quantized weights: the quantizer's settings and its storage."""
    backend = QUANT_BACKENDS.get(config.quant.method)
    return {**quantizer_options(config.quant), **backend.storage(config, dtype)}


def quantizer_for(spec: QuantSpec) -> Quantizer:
    """The fake-quantizer matching the loaded layers (for calibration with quantized propagation)."""
    return get_quantizer(spec.method, **QUANT_BACKENDS.get(spec.method).quantizer_options(spec))


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


def _quantize_left_linears(model: nn.Module) -> None:
    """Quantize, like the model's other layers, the decoder layers' linear layers that transformers'
    bitsandbytes loading leaves in full precision: it only replaces modules of type exactly nn.Linear, so
    Falcon's FalconLinear and fused MoE experts (split into nn.Linear by quailora.architectures.prepare)
    stay unquantized otherwise."""
    bnb_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, BitsAndBytesConfig):
        return
    for name in Layout.of(model, prepared=set()).linears():
        module = model.get_submodule(name)
        if not isinstance(module, bnb_types):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_bnb(module, config))


def load_quantized_model(
    checkpoint: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The checkpoint quantized as ``quant`` asks, with every projection an nn.Linear-like layer of
    weight (out, in) (quailora.architectures.prepare: GPT-2's Conv1D, fused MoE experts)."""
    model = QUANT_BACKENDS.get(config.quant.method, where="quant.method").load(
        checkpoint, config, dtype, device
    )
    _quantize_left_linears(model)
    return model


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
    QUANT_BACKENDS.get(config.quant.method, where="quant.method").save(model, out)


def load_saved_quantized_model(
    saved: Path, config: TrialConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    return QUANT_BACKENDS.get(config.quant.method, where="quant.method").load_saved(saved, dtype, device)
