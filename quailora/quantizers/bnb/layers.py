"""bitsandbytes base layers (Linear4bit, Linear8bitLt): what initialization reads and writes in them,
and one nn.Linear quantized into one."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn
from transformers import BitsAndBytesConfig

from quailora.errors import QuailoraInputError
from quailora.quantizers.backend import BaseLayerKind
from quailora.quantizers.bnb.fake import Bnb4bitQuantizer, Int8Quantizer


def _linear4bit_dequantize(layer: nn.Module) -> torch.Tensor:
    # bnb repacks weights for its AVX512-BF16 CPU inference kernel on the first eval forward; undo that first
    # (as bnb's own state_dict saving does) so we read the canonical codes.
    w = layer.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        layer.quant_state = w.quant_state
    return dequantize_bnb_weight(w).to(torch.float32)


def exact_cpu_4bit(model: nn.Module) -> int:
    """Turn off bnb's bf16 CPU inference path so eval computes with the same fp32 Q as training and init.

    Returns how many Linear4bit layers were changed. (That path repacks weights and rounds through bf16.)
    """
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        _linear4bit_dequantize(layer)
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _linear4bit_quantizer(layer: nn.Module) -> Bnb4bitQuantizer:
    w = layer.weight
    return Bnb4bitQuantizer(
        w.quant_type, blocksize=w.blocksize, double_quant=w.compress_statistics, dtype=w.quant_state.dtype
    )


def _linear4bit_requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    _store_4bit(layer, weight.to(layer.weight.quant_state.dtype))


def _store_4bit(layer: nn.Module, weight: torch.Tensor) -> None:
    """quant(``weight``) into a Linear4bit with the layer's own 4-bit settings: packed codes and quant state."""
    old = layer.weight
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(),
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state


def _linear8bit_requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    layer.state.SCB = scb
    layer.state.CB = cb


LINEAR_4BIT = BaseLayerKind(
    dequantize=_linear4bit_dequantize,
    quantizer=_linear4bit_quantizer,
    requantize=_linear4bit_requantize,
)
LINEAR_8BIT = BaseLayerKind(
    dequantize=lambda layer: dequantize_bnb_weight(layer.weight, state=layer.state).to(torch.float32),
    quantizer=lambda layer: Int8Quantizer(),
    requantize=_linear8bit_requantize,
)


def quantize_bnb(linear: nn.Linear, config: BitsAndBytesConfig) -> nn.Module:
    """A bitsandbytes layer holding quant(``linear.weight``) as transformers' ``BitsAndBytesConfig``
    ``config`` asks (4-bit or LLM.int8), on the weight's device.

    For linear layers that transformers' quantized loading leaves in full precision (it replaces only
    modules of type exactly nn.Linear), so they are quantized like the model's other layers.
    """
    weight = linear.weight.detach()
    bias = linear.bias is not None
    if config.load_in_4bit:
        storage = config.bnb_4bit_quant_storage
        storage = getattr(torch, storage) if isinstance(storage, str) else storage
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
            device="meta",
        )
        _store_4bit(layer, weight)
    elif config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
        )
        _linear8bit_requantize(layer, weight)
        layer.to(weight.device)
    else:
        raise QuailoraInputError(f"quantize_bnb: {config!r} asks for neither 4-bit nor 8-bit")
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer
