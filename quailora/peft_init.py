"""Initialize the LoRA layers of a peft model built on a quantized transformers model.

Layer by layer and restartable on any subset of layers: W is read lazily from the full-precision
checkpoint, Q from the base layer itself (so init and training see the same Q), H from a GramStore.
Workers can each compute a disjoint share (``names=``) and exchange the small results.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from quailora.api import initialize, method_options, validate_options
from quailora.architectures.derive import PEFT_PREFIX as _PEFT_PREFIX
from quailora.base_layers import base_layer_kind
from quailora.errors import QuailoraInputError
from quailora.initializers import INITIALIZERS, needs_gram
from quailora.quantizers.base import Quantizer


class WeightSource(Protocol):
    def get(self, name: str) -> torch.Tensor: ...
    def __contains__(self, name: object) -> bool: ...


class GramSource(Protocol):
    def get(self, module_name: str) -> torch.Tensor: ...
    def names(self) -> list[str]: ...


@dataclass
class LayerUpdate:
    """What one layer's initialization changes: peft's A and B, and the base weight when the method moves Q."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base_weight: torch.Tensor | None = None  # re-quantize the base layer from this (loftq)
    history: list[float] = field(default_factory=list)


def checkpoint_name(peft_name: str) -> str:
    """peft module name -> the module's name in the original checkpoint."""
    return peft_name.removeprefix(_PEFT_PREFIX)


def lora_layer_names(model: nn.Module, adapter_name: str = "default") -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]


def _is_linear_like(module: nn.Module) -> bool:
    return (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and not isinstance(module, LoraLayer)
    )


def validate_lora_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    rank: int,
    exclude: Callable[[str], bool] = lambda n: False,
) -> list[str]:
    """Check targets and rank against the (unwrapped) model before any compute; return the targeted names.
    ``all-linear`` is every linear layer but the output head and those ``exclude`` names (MoE routers)."""
    linear = {name: m for name, m in model.named_modules() if _is_linear_like(m)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if target_modules == "all-linear":
        chosen = [n for n, m in linear.items() if m is not output and not exclude(n)]
    else:
        chosen = []
        for target in target_modules:
            hits = [n for n in linear if n == target or n.endswith(f".{target}")]
            if not hits:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
                raise QuailoraInputError(
                    f"lora.target_modules: {target!r} matches no linear module of the model; available: {suffixes}"
                )
            chosen += hits
    for name in chosen:
        m = linear[name]
        if rank > min(m.in_features, m.out_features):
            raise QuailoraInputError(
                f"lora.rank={rank} exceeds layer {name} ({m.out_features} x {m.in_features}): "
                f"at most {min(m.in_features, m.out_features)}"
            )
    return chosen


def compute_adapters(
    model: nn.Module,
    method: str,
    weights: WeightSource,
    grams: GramSource | None = None,
    *,
    names: list[str] | None = None,
    quantizer: Quantizer | None = None,
    adapter_name: str = "default",
    seed: int = 0,
    **options,
) -> dict[str, LayerUpdate]:
    """Initialize the given LoRA layers (all by default). Checks every layer before computing any.

    Methods that draw random numbers get a seed per layer derived from ``seed`` and the layer's name, so
    same-shaped layers differ, the trial seed reaches every layer, and any worker split gives the same result.
    """
    fn = INITIALIZERS.get(method, where="init.method")
    seeded = "seed" in method_options(fn)
    modules = dict(model.named_modules())
    names = lora_layer_names(model, adapter_name) if names is None else names
    calibrated = needs_gram(method)
    gram_names = set(grams.names()) if grams is not None else set()
    for name in names:
        if not isinstance(modules.get(name), LoraLayer):
            raise QuailoraInputError(f"layer {name}: not a LoRA layer of this model")
        base_layer_kind(modules[name].get_base_layer(), name)
        key = f"{checkpoint_name(name)}.weight"
        if key not in weights:
            raise QuailoraInputError(f"layer {name}: full-precision weight {key!r} is not in the checkpoint")
        if calibrated and checkpoint_name(name) not in gram_names:
            raise QuailoraInputError(
                f"layer {name}: method {method!r} needs a Gram for {checkpoint_name(name)!r}; none was collected"
            )
        validate_options(
            method,
            _layer_options(modules[name], options, adapter_name, seeded, seed, name),
            where=f"layer {name}",
        )

    updates = {}
    for name in names:
        module = modules[name]
        base = module.get_base_layer()
        kind = base_layer_kind(base, name)
        quantized = kind.dequantize(base)
        weight = weights.get(f"{checkpoint_name(name)}.weight").to(quantized.device)
        layer_options = _layer_options(module, options, adapter_name, seeded, seed, name)
        result = initialize(
            weight,
            quantized,
            module.r[adapter_name],
            method,
            gram=grams.get(checkpoint_name(name)) if calibrated else None,
            scaling=module.scaling[adapter_name],
            name=name,
            quantizer=quantizer or kind.quantizer(base),
            **layer_options,
        )
        updates[name] = LayerUpdate(result.lora_A, result.lora_B, result.base_weight, result.history)
    return updates


def _layer_options(
    module: nn.Module, options: dict, adapter_name: str, seeded: bool, seed: int, name: str
) -> dict:
    layer_options = dict(options)
    if hasattr(module, "qalora_group_size"):  # QA-LoRA: A acts on pooled inputs, the layer knows the pool
        layer_options.setdefault("group_size", module.qalora_group_size[adapter_name])
    if seeded:
        layer_options.setdefault("seed", layer_seed(seed, name))
    return layer_options


def layer_seed(seed: int, name: str) -> int:
    """A stable 31-bit seed per (trial seed, layer name); crc32 rather than hash(), which is salted per process."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def apply_adapters(model: nn.Module, updates: dict[str, LayerUpdate], adapter_name: str = "default") -> None:
    """Write computed adapters (and re-quantized base weights) into the model, in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, update in updates.items():
            module = modules[name]
            for param, value in (
                (module.lora_A[adapter_name].weight, update.lora_A),
                (module.lora_B[adapter_name].weight, update.lora_B),
            ):
                if param.shape != value.shape:
                    raise QuailoraInputError(
                        f"layer {name}: adapter shape {tuple(value.shape)} != parameter shape {tuple(param.shape)}"
                    )
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            if update.base_weight is not None:
                base = module.get_base_layer()
                base_layer_kind(base, name).requantize(base, update.base_weight)


def initialize_peft_model(
    model: nn.Module,
    method: str,
    weights: WeightSource,
    grams: GramSource | None = None,
    *,
    adapter_name: str = "default",
    **options,
) -> dict[str, LayerUpdate]:
    """compute_adapters on every LoRA layer, then apply_adapters. Returns the per-layer updates."""
    updates = compute_adapters(model, method, weights, grams, adapter_name=adapter_name, **options)
    apply_adapters(model, updates, adapter_name)
    return updates
