"""How a trial puts its adapter on the quantized model, one builder per adapter kind.

Builders are keyed by the adapter kind each initializer declares when it registers
(quailora.initializers.adapter_kind): "plain" goes through peft's LoraConfig, "pooled" (QA-LoRA) uses the
pooled adapter of ``quailora.qalora``. Adding a kind means registering one builder.
"""

from __future__ import annotations

from collections.abc import Callable

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from quailora.architectures.experts import peft_sees_split_experts
from quailora.errors import QuailoraInputError
from quailora.initializers import adapter_kind
from quailora.peft_init import checkpoint_name, lora_layer_names
from quailora.qalora.adapter import apply_qalora, register_groupwise
from quailora.quantizers import QUANTIZER_SPECS, quantizer_spec
from quailora.registry import Registry
from trials.config import TrialConfig

AdapterBuilder = Callable[[nn.Module, TrialConfig, list[str]], PeftModel]
ADAPTER_BUILDERS: Registry[AdapterBuilder] = Registry("adapter kind")


@ADAPTER_BUILDERS.register("plain")
def build_lora(model: nn.Module, config: TrialConfig, targets: list[str]) -> PeftModel:
    lora = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        use_rslora=config.lora.use_rslora,
        target_modules=targets,
    )
    # Registering the group-wise INT-k layer is harmless on bnb models and lets LoRA sit on INT-k bases.
    with peft_sees_split_experts():
        return get_peft_model(model, register_groupwise(lora))


@ADAPTER_BUILDERS.register("pooled")
def build_qalora(model: nn.Module, config: TrialConfig, targets: list[str]) -> PeftModel:
    return apply_qalora(
        model,
        config.lora.rank,
        config.lora.alpha,
        config.quant.group_size,
        targets,
        lora_dropout=config.lora.dropout,
        use_rslora=config.lora.use_rslora,
    )


def check_adapter_kind(config: TrialConfig) -> None:
    """The quantizer must carry the method's adapter kind (a pooled adapter folds into zero points)."""
    kind = adapter_kind(config.init.method)
    spec = quantizer_spec(config.quant.method)
    if kind not in spec.adapters:
        able = [name for name in QUANTIZER_SPECS if kind in QUANTIZER_SPECS.get(name).adapters]
        needed = f"={able[0]!r}" if len(able) == 1 else f" in {able}"
        raise QuailoraInputError(
            f"init.method={config.init.method!r} trains a {kind} adapter and needs quant.method{needed} "
            f"(a quantizer that carries one), got {config.quant.method!r}"
        )


def build_adapter(model: nn.Module, config: TrialConfig, targets: list[str]) -> PeftModel:
    """The trial's adapter on every target; a target peft passed over is an error, never a silent gap."""
    peft_model = ADAPTER_BUILDERS.get(adapter_kind(config.init.method), where="init.method")(
        model, config, targets
    )
    missing = sorted(set(targets) - {checkpoint_name(n) for n in lora_layer_names(peft_model)})
    if missing:
        raise QuailoraInputError(
            f"init.method={config.init.method!r}: peft put no adapter on {len(missing)} target(s), e.g. {missing[:3]}"
        )
    return peft_model
