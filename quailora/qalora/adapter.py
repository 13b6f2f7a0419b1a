"""peft LoRA / QA-LoRA on top of GroupwiseLinear, through peft's custom-module mechanism.

peft 0.21 ships the QA-LoRA pooled adapter (``LoraConfig(use_qalora=True, qalora_group_size=L)``,
``QALoraLinearVariant``) but dispatches it only to GPTQ layers; registering GroupwiseLoraLinear for
GroupwiseLinear lets ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` drive it,
and gives plain LoRA on INT-2/3 bases (QLoRA, QuAILoRA) with ``use_qalora=False``. Pooling convention: see
``quailora.qalora.pooling`` (peft's mean x n/L).

``lora_from_qalora``: the plain LoRA adapter equal to a QA-LoRA one (lora_A' = A·P), which stock peft
puts on any linear layer; peft runs QA-LoRA itself only on GPTQ layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.lora.variants import QALoraLinearVariant
from torch import nn

from quailora.architectures.experts import peft_sees_split_experts
from quailora.errors import QuailoraInputError
from quailora.qalora.pooling import expand
from quailora.quantizers.groupwise.layer import GroupwiseLinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class GroupwiseLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer around a GroupwiseLinear; with ``use_qalora`` its lora_A reads pooled inputs.

    Merging into the base goes through ``quailora.qalora.merge`` (into zero points), not peft's merge.
    """

    def __init__(
        self,
        base_layer: GroupwiseLinear,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        target_name: str = "",
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=target_name)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> LoraVariant | None:
        variant = super().resolve_lora_variant(config=config)  # rejects DoRA & co. ({(): None} only)
        return QALoraLinearVariant() if config.use_qalora else variant

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if config.use_qalora:
            self._check_qalora_groups(config.qalora_group_size, kwargs.get("target_name") or "layer")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _check_qalora_groups(self, pool_size: int, name: str) -> None:
        """The pooled update is constant per pooling group; it folds into zero points only if each
        quantization group lies inside one pooling group."""
        base = self.get_base_layer()
        if pool_size % base.group_size or base.in_features % pool_size:
            raise QuailoraInputError(
                f"layer {name}: qalora_group_size={pool_size} must be a multiple of the layer's quantization "
                f"group_size={base.group_size} and divide in_features={base.in_features}"
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)  # peft's extra kwargs (e.g. adapter_names) are not for the base
        if self.disable_adapters:
            return result
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[active_adapter]
            x_cast = self._cast_input_dtype(x, lora_A.weight.dtype)
            if active_adapter in self.lora_variant:
                adapted = self.lora_variant[active_adapter].forward(
                    self, active_adapter=active_adapter, x=x_cast, result=result
                )
            else:
                dropout = self.lora_dropout[active_adapter]
                adapted = (
                    result
                    + self.lora_B[active_adapter](lora_A(dropout(x_cast))) * self.scaling[active_adapter]
                )
            result = adapted.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def groupwise_lora_config(
    rank: int,
    alpha: float,
    target_modules: Iterable[str],
    qalora_group_size: int | None = None,
    **lora_options,
) -> LoraConfig:
    """LoraConfig that puts GroupwiseLoraLinear on GroupwiseLinear targets; QA-LoRA when a group size is given."""
    if qalora_group_size is not None:
        lora_options = {**lora_options, "use_qalora": True, "qalora_group_size": qalora_group_size}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), **lora_options)
    return register_groupwise(config)


def register_groupwise(config: LoraConfig) -> LoraConfig:
    """Register the custom layer on a config (peft does not save this mapping, so loading needs it again)."""
    config._register_custom_module({GroupwiseLinear: GroupwiseLoraLinear})
    return config


def apply_qalora(
    model: nn.Module, rank: int, alpha: float, group_size: int, target_modules: Iterable[str], **lora_options
) -> PeftModel:
    """get_peft_model with a QA-LoRA adapter of pooling group ``group_size`` on the GroupwiseLinear targets."""
    with peft_sees_split_experts():  # MoE experts are split into linears here, as for plain LoRA
        return get_peft_model(
            model, groupwise_lora_config(rank, alpha, target_modules, group_size, **lora_options)
        )


def load_groupwise_adapter(model: nn.Module, adapter_dir: str | Path, **kwargs) -> PeftModel:
    """PeftModel.from_pretrained for an adapter saved from a GroupwiseLinear model (LoRA or QA-LoRA)."""
    config = register_groupwise(LoraConfig.from_pretrained(str(adapter_dir)))
    with peft_sees_split_experts():
        return PeftModel.from_pretrained(model, str(adapter_dir), config=config, **kwargs)


def lora_from_qalora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the plain LoRA adapter equal to the QA-LoRA adapter in ``adapter_dir``: B·A·(P x) = B·(A P)·x,
    so lora_A' = A P (r x n, constant over each pooling group) and lora_B, scaling and targets unchanged."""
    src, out = Path(adapter_dir), Path(out_dir)
    config = LoraConfig.from_pretrained(str(src))
    if not config.use_qalora:
        raise QuailoraInputError(f"lora_from_qalora: {src} is not a QA-LoRA adapter (use_qalora is false)")
    weights = safetensors.torch.load_file(str(src / ADAPTER_WEIGHTS))
    for key, value in weights.items():
        if key.endswith("lora_A.weight"):
            weights[key] = expand(value, config.qalora_group_size).contiguous()
    config.use_qalora = False
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    safetensors.torch.save_file(weights, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out
