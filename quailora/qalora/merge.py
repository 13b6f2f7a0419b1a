"""Fold a trained QA-LoRA adapter into the zero points, so the merged model is still INT-k.

The update s·B·A·P is constant over each pooling group, hence over each quantization group inside it:
for row i and quantization group g it adds the same δ = (s·B·A·P)[i, j ∈ g] to every weight. Since
α(c − z) + δ = α(c − (z − δ/α)), the merge is z' = z − δ/α with codes and scales unchanged. Zeros are
float32 (see quailora.quantizers.groupwise.codes), so z' is kept exactly instead of being rounded to an integer.
The merged model is saved like any group-wise INT-k model (quailora.quantizers.groupwise.packed, or
compressed-tensors through quailora.quantizers.groupwise.compressed).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora.variants import QALoraLinearVariant
from torch import nn

from quailora.errors import QuailoraInputError
from quailora.qalora.adapter import GroupwiseLoraLinear
from quailora.qalora.pooling import pooling_factor
from quailora.quantizers.groupwise.layer import GroupwiseLinear


def zero_point_shift(layer: GroupwiseLoraLinear, adapter: str, name: str = "layer") -> torch.Tensor:
    """δ/α per (row, quantization group) for one QA-LoRA adapter of one layer."""
    base: GroupwiseLinear = layer.get_base_layer()
    if not isinstance(layer.lora_variant.get(adapter), QALoraLinearVariant):
        raise QuailoraInputError(
            f"layer {name}: adapter {adapter!r} is plain LoRA; its update is not constant per group, "
            "so it cannot be folded into zero points (train it with use_qalora=True)"
        )
    if layer.lora_bias[adapter]:
        raise QuailoraInputError(
            f"layer {name}: adapter {adapter!r} has lora_bias=True, which zeros cannot hold"
        )
    pool_size = layer.qalora_group_size[adapter]
    y = layer.scaling[adapter] * (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight)
    # δ per pooling group, repeated for the quantization groups inside it (pool_size is a multiple).
    delta = (y.float() * pooling_factor(base.in_features, pool_size)).repeat_interleave(
        pool_size // base.group_size, dim=1
    )
    return delta / base.scale_values().float()


@torch.no_grad()
def merge_qalora(model: PeftModel) -> nn.Module:
    """Fold every active QA-LoRA adapter into its GroupwiseLinear's zeros; return the unwrapped base model."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GroupwiseLoraLinear)]
    if not layers:
        raise QuailoraInputError("merge_qalora: the model has no GroupwiseLoraLinear layer to merge")
    # All shifts are computed (and checked) before any zero point changes.
    shifts = [
        (layer, zero_point_shift(layer, a, name)) for name, layer in layers for a in layer.active_adapters
    ]
    for layer, shift in shifts:
        layer.get_base_layer().zero_values().sub_(shift)
    return model.unload()
