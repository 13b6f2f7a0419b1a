"""A frozen group-wise INT-k linear layer that keeps only packed codes, scales and zeros in memory."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quailora.errors import QuailoraInputError
from quailora.quantizers.groupwise.codes import (
    SCALE_DTYPE,
    ZERO_DTYPE,
    GroupwiseIntQuantizer,
    GroupwiseQuantized,
    dequantize_packed,
    packed_words,
)


class _GroupwiseMatmul(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized in x's dtype for the forward, and again for the input's gradient in
    the backward (as bitsandbytes' 4-bit matmul does). F.linear on a dequantized W would keep W for the
    backward: one full-size copy per layer alive from its forward to its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: GroupwiseLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None, None  # W and b are frozen


class GroupwiseLinear(nn.Module):
    """y = x Wᵀ + b with W dequantized on every forward, in x's dtype (nothing of size out x in is kept).

    Buffers: ``qweight`` (packed int32 codes; named like GPTQ's so peft finds the layer's device),
    ``scales`` (float16) and ``zeros`` (float32), both (out, in / group_size). Scales and zeros are held
    as their int16/int32 bit patterns, so ``model.to(dtype)``, ``.half()`` or DeepSpeed's casts, which
    convert floating-point buffers only, never change the quantized weight; read them via
    ``scale_values()`` / ``zero_values()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        GroupwiseIntQuantizer(bits, group_size).check_shape((out_features, in_features), "GroupwiseLinear")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = (out_features, in_features // group_size)
        words = packed_words(out_features * in_features, bits)
        self.register_buffer("qweight", torch.zeros(words, dtype=torch.int32, device=device))
        ones = torch.ones(groups, dtype=SCALE_DTYPE, device=device)
        self.register_buffer("scales", ones.view(torch.int16))
        self.register_buffer("zeros", torch.zeros(groups, dtype=ZERO_DTYPE, device=device).view(torch.int32))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_quantized(cls, q: GroupwiseQuantized, bias: torch.Tensor | None = None) -> GroupwiseLinear:
        out_features, in_features = q.shape
        layer = cls(
            in_features, out_features, q.bits, q.group_size, bias=bias is not None, device=q.codes.device
        )
        layer.qweight.copy_(q.codes)
        layer.scale_values().copy_(q.scales)
        layer.zero_values().copy_(q.zeros)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, name: str = "linear"
    ) -> GroupwiseLinear:
        q = GroupwiseIntQuantizer(bits, group_size).quantize(linear.weight.detach(), name=name)
        return cls.from_quantized(q, linear.bias)

    def scale_values(self) -> torch.Tensor:
        """float16 α per (row, group): a view, so in-place edits change the layer."""
        return self.scales.view(SCALE_DTYPE)

    def zero_values(self) -> torch.Tensor:
        """float32 zero point per (row, group): a view, so in-place edits (the QA-LoRA merge) change the layer."""
        return self.zeros.view(ZERO_DTYPE)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with (out x in): float32 values, rounded once to ``dtype``."""
        shape = (self.out_features, self.in_features)
        return dequantize_packed(
            self.qweight, self.scale_values(), self.zero_values(), shape, self.bits, self.group_size, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GroupwiseMatmul.apply(x, self.bias, self)

    def storage_bytes(self) -> int:
        """Bytes held by the layer: packed codes + scales + zeros (+ bias)."""
        tensors = [self.qweight, self.scales, self.zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _is_output_head(model: nn.Module, module: nn.Module) -> bool:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head is not None and get_head() is module


def groupwise_targets(
    model: nn.Module, target_modules: Iterable[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to quantize (never the output head): those whose names end in one of
    ``target_modules`` (module-name suffixes as in peft), or every one when it is None."""
    suffixes = None if target_modules is None else tuple(target_modules)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not _is_output_head(model, module)
        and (suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes))
    ]
    if not targets:
        raise QuailoraInputError(
            f"quantize_model_groupwise: target_modules={suffixes} matched no nn.Linear layer"
        )
    return targets


def check_groupwise_targets(targets: list[tuple[str, nn.Linear]], group_size: int) -> None:
    for name, module in targets:
        if module.in_features % group_size:
            raise QuailoraInputError(
                f"layer {name}: weight of shape (out={module.out_features}, in={module.in_features}) has "
                f"in_features not divisible by group_size={group_size}"
            )


def quantize_model_groupwise(
    model: nn.Module, bits: int, group_size: int, target_modules: Iterable[str] | None = None
) -> nn.Module:
    """Swap nn.Linear modules (never the output head) for GroupwiseLinear, in place; returns the model.

    target_modules: module-name suffixes as in peft (e.g. ``["q_proj", "v_proj"]``); None means every
    linear layer but the head. Every target is checked before any layer is quantized. (A trial loads its
    base with quailora.quantizers.groupwise.loading instead, which never holds the full-precision model.)
    """
    GroupwiseIntQuantizer(bits, group_size)  # validates bits and group_size
    targets = groupwise_targets(model, target_modules)
    check_groupwise_targets(targets, group_size)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GroupwiseLinear.from_linear(module, bits, group_size, name=name))
    return model
