"""bitsandbytes models: loaded through transformers' BitsAndBytesConfig, saved by its serialization
(which is also the stock export), base layers Linear4bit and Linear8bitLt."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from quailora.architectures import Layout, prepare
from quailora.errors import QuailoraInputError
from quailora.quantizers.backend import QuantBackend
from quailora.quantizers.base import QuantSettings
from quailora.quantizers.bnb.fake import Bnb4bitQuantizer, Int8Quantizer
from quailora.quantizers.bnb.layers import LINEAR_4BIT, LINEAR_8BIT, quantize_bnb

# transformers 5 builds bnb 4-bit layers with bitsandbytes' default block size; it cannot be chosen.
BNB_4BIT_BLOCKSIZE = 64


def _check_4bit(settings: QuantSettings) -> None:
    if settings.blocksize != BNB_4BIT_BLOCKSIZE:
        raise QuailoraInputError(
            f"quant.blocksize={settings.blocksize}: transformers' bitsandbytes 4-bit loading only uses {BNB_4BIT_BLOCKSIZE}"
        )


def _4bit_storage(dtype: torch.dtype, float_storage: bool) -> torch.dtype:
    # ZeRO-3 partitions every parameter: transformers' DeepSpeed guide says to store the packed 4-bit
    # weights in the model's float dtype so they can be sharded and gathered like the others.
    return dtype if float_storage else torch.uint8


def _config(settings: QuantSettings, dtype: torch.dtype, float_storage: bool = False) -> BitsAndBytesConfig:
    if settings.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.method,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=_4bit_storage(dtype, float_storage),
    )


def _quantize_left_linears(model: nn.Module, config: BitsAndBytesConfig) -> None:
    """Quantize, like the model's other layers, the decoder layers' linear layers that transformers'
    bitsandbytes loading leaves in full precision: it only replaces modules of type exactly nn.Linear, so
    Falcon's FalconLinear and fused MoE experts (split into nn.Linear by quailora.architectures.prepare)
    stay unquantized otherwise."""
    for name in Layout.of(model, prepared=set()).linears():
        module = model.get_submodule(name)
        if not isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_bnb(module, config))


def _load(
    checkpoint: Path, settings: QuantSettings, dtype: torch.dtype, device: torch.device, float_storage: bool
) -> nn.Module:
    config = _config(settings, dtype, float_storage)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=config, dtype=dtype, device_map={"": str(device)}
    )
    prepare(model)
    _quantize_left_linears(model, config)
    return model


def _save(model: nn.Module, out: Path) -> None:
    """transformers' bitsandbytes serialization: packed codes and quant states, config.json says how."""
    model.save_pretrained(out, safe_serialization=True)


def _load_saved(saved: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, device_map={"": str(device)})


def _backend(name: str, quantizer, layers, **extra) -> QuantBackend:
    return QuantBackend(
        name=name,
        quantizer=quantizer,
        load=_load,
        quantize_linear=lambda linear, settings: quantize_bnb(linear, _config(settings, linear.weight.dtype)),
        save=_save,
        load_saved=_load_saved,
        save_stock=_save,
        layers=layers,
        **extra,
    )


def _4bit(name: str) -> QuantBackend:
    return _backend(
        name,
        lambda **options: Bnb4bitQuantizer(name, **options),
        {bnb.nn.Linear4bit: LINEAR_4BIT},
        check=_check_4bit,
        storage=lambda settings, dtype, float_storage: {
            "quant_storage": str(_4bit_storage(dtype, float_storage))
        },
    )


NF4 = _4bit("nf4")
FP4 = _4bit("fp4")
INT8 = _backend("int8", Int8Quantizer, {bnb.nn.Linear8bitLt: LINEAR_8BIT})
