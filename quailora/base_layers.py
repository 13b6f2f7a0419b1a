"""What initialization needs from each kind of frozen base layer, one entry per layer type.

dequantize(layer) -> Q exactly as the forward pass uses it; quantizer(layer) -> a Quantizer with the
layer's own settings (for methods that re-quantize); requantize(layer, W') stores quant(W') in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from quailora.errors import QuailoraInputError
from quailora.qalora.layer import GroupwiseLinear
from quailora.quantizers import get_quantizer
from quailora.quantizers.base import Quantizer


@dataclass(frozen=True)
class BaseLayerKind:
    dequantize: Callable[[nn.Module], torch.Tensor]
    quantizer: Callable[[nn.Module], Quantizer | None]  # None: the layer carries no quantizer
    requantize: Callable[[nn.Module, torch.Tensor], None]


BASE_LAYERS: dict[type, BaseLayerKind] = {}


def register_base_layer(cls: type, kind: BaseLayerKind) -> None:
    BASE_LAYERS[cls] = kind


def base_layer_kind(layer: nn.Module, name: str = "layer") -> BaseLayerKind:
    # Most specific registered class first (bnb layers subclass nn.Linear).
    for cls in type(layer).__mro__:
        if cls in BASE_LAYERS:
            return BASE_LAYERS[cls]
    raise QuailoraInputError(
        f"layer {name}: base layer type {type(layer).__name__} is not supported; "
        f"supported: {sorted(c.__name__ for c in BASE_LAYERS)}"
    )


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


def eval_path(device: torch.device, dtype: torch.dtype) -> str:
    """How the quantized base layers compute a trial's forwards (evaluation and training), e.g.
    ``cuda-bfloat16``: on ``device``, with each layer's Q rounded to ``dtype`` before the matmul
    (bitsandbytes 4-bit on CUDA, or on CPU once exact_cpu_4bit turned its bf16 kernel off; GroupwiseLinear).
    ``float32`` computes with the very Q initialization solved against; bf16/fp16 round it, so one config
    evaluated on two paths gives slightly different perplexities."""
    return f"{device.type}-{str(dtype).removeprefix('torch.')}"


def _linear4bit_quantizer(layer: nn.Module) -> Quantizer:
    w = layer.weight
    return get_quantizer(
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


def _linear_requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))


register_base_layer(
    bnb.nn.Linear4bit,
    BaseLayerKind(
        dequantize=_linear4bit_dequantize,
        quantizer=_linear4bit_quantizer,
        requantize=_linear4bit_requantize,
    ),
)
register_base_layer(
    bnb.nn.Linear8bitLt,
    BaseLayerKind(
        dequantize=lambda layer: dequantize_bnb_weight(layer.weight, state=layer.state).to(torch.float32),
        quantizer=lambda layer: get_quantizer("int8"),
        requantize=_linear8bit_requantize,
    ),
)


def _groupwise_requantize(layer: GroupwiseLinear, weight: torch.Tensor) -> None:
    q = get_quantizer("int", bits=layer.bits, group_size=layer.group_size).quantize(weight)
    layer.qweight.copy_(q.codes)
    layer.scale_values().copy_(q.scales)
    layer.zero_values().copy_(q.zeros)


register_base_layer(
    GroupwiseLinear,
    BaseLayerKind(
        dequantize=lambda layer: layer.dequantize(),
        quantizer=lambda layer: get_quantizer("int", bits=layer.bits, group_size=layer.group_size),
        requantize=_groupwise_requantize,
    ),
)


# A plain Linear holds an already fake-quantized (or full-precision) weight: Q is the weight itself.
register_base_layer(
    nn.Linear,
    BaseLayerKind(
        dequantize=lambda layer: layer.weight.detach().to(torch.float32),
        quantizer=lambda layer: None,
        requantize=_linear_requantize,
    ),
)


def quantize_bnb(linear: nn.Linear, config) -> nn.Module:
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
