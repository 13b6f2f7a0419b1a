"""Initialize the LoRA layers of a peft model built on a quantized transformers model.

Layer by layer and restartable on any subset of layers: W is read lazily from the full-precision
checkpoint, Q from the base layer itself (so init and training see the same Q), H from a GramStore.
Workers can each compute a disjoint share (``names=``) and exchange the small results.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from quailora.api import initialize, validate_options
from quailora.architectures.derive import PEFT_PREFIX as _PEFT_PREFIX
from quailora.base_layers import base_layer_kind
from quailora.errors import QuailoraInputError
from quailora.initializers import adapter_kind, effective_init_options, needs_gram, rebuilt_base
from quailora.quantizers.base import Quantizer


class WeightSource(Protocol):
    def get(self, name: str, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """The full-precision weight as float32 on ``device`` (read there in its stored dtype, converted there)."""
        ...

    def __contains__(self, name: object) -> bool: ...


class GramSource(Protocol):
    def get(self, module_name: str) -> torch.Tensor: ...
    def names(self) -> list[str]: ...
    def tokens(self, module_name: str) -> int | None: ...


def too_few_tokens(grams: GramSource, module_name: str, in_features: int) -> bool:
    """Whether the module's Gram came from fewer calibration tokens than its input width (or none): such an
    H = XᵀX/N has rank at most N < in, so the calibrated objective ignores the directions no token spanned.
    At 128 experts and more most experts see few tokens; they get the uncalibrated solve (H = I) instead."""
    tokens = grams.tokens(module_name)
    return tokens is not None and tokens < in_features


@dataclass
class LayerUpdate:
    """What one layer's initialization changes: peft's A and B, and, for methods that move Q (loftq), the
    thin factors (L, R) such that the base layer is re-quantized from W − L·R. All small: r x (in + out)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base_residual: tuple[torch.Tensor, torch.Tensor] | None = None
    history: list[float] = field(default_factory=list)
    uncalibrated: bool = False  # a calibrated method solved with H = I: too few tokens (too_few_tokens)

    def cpu(self) -> LayerUpdate:
        """A copy on the CPU: what may be pickled to other processes (a CUDA tensor would unpickle onto
        the sender's device, creating a context on a peer's GPU) or written to the cache."""
        residual = tuple(t.cpu() for t in self.base_residual) if self.base_residual else None
        return LayerUpdate(
            self.lora_A.cpu(), self.lora_B.cpu(), residual, list(self.history), self.uncalibrated
        )


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
    pooled = adapter_kind(method) == "pooled"
    modules = dict(model.named_modules())
    names = lora_layer_names(model, adapter_name) if names is None else names
    gram_names = set(grams.names()) if grams is not None else set()
    for name in names:
        _check_layer(modules.get(name), name, method, weights, grams, gram_names)
        validate_options(
            method,
            _layer_options(modules[name], method, options, adapter_name, pooled, seed, name),
            where=f"layer {name}",
        )
    return {
        name: _solve_layer(
            modules[name],
            name,
            method,
            weights,
            grams,
            quantizer,
            _layer_options(modules[name], method, options, adapter_name, pooled, seed, name),
            adapter_name,
        )
        for name in names
    }


def _check_layer(
    module: nn.Module | None,
    name: str,
    method: str,
    weights: WeightSource,
    grams: GramSource | None,
    gram_names: set[str],
) -> None:
    """What one layer's solve reads exists: a LoRA layer over a known base, its full-precision weight, and
    for a calibrated method its Gram (an expert no token reached has none and falls back to H = I)."""
    if not isinstance(module, LoraLayer):
        raise QuailoraInputError(f"layer {name}: not a LoRA layer of this model")
    base_layer_kind(module.get_base_layer(), name)
    if f"{checkpoint_name(name)}.weight" not in weights:
        raise QuailoraInputError(
            f"layer {name}: full-precision weight {checkpoint_name(name) + '.weight'!r} is not in the checkpoint"
        )
    key = checkpoint_name(name)
    if needs_gram(method) and key not in gram_names and grams.tokens(key) != 0:
        raise QuailoraInputError(
            f"layer {name}: method {method!r} needs a Gram for {key!r}; none was collected"
        )


def _solve_layer(
    module: nn.Module,
    name: str,
    method: str,
    weights: WeightSource,
    grams: GramSource | None,
    quantizer: Quantizer | None,
    layer_options: dict,
    adapter_name: str,
) -> LayerUpdate:
    """One layer's init from its full-precision weight, its quantized base and (calibrated) its Gram; its
    problem's tensors are freed on return, before the next layer's are read."""
    base = module.get_base_layer()
    kind = base_layer_kind(base, name)
    quantized = kind.dequantize(base)
    weight = weights.get(f"{checkpoint_name(name)}.weight", device=quantized.device)
    calibrated = needs_gram(method)
    fallback = calibrated and too_few_tokens(grams, checkpoint_name(name), weight.shape[1])
    gram = None
    if calibrated:
        gram = torch.eye(weight.shape[1]) if fallback else grams.get(checkpoint_name(name))
    result = initialize(
        weight,
        quantized,
        module.r[adapter_name],
        method,
        gram=gram,
        scaling=module.scaling[adapter_name],
        name=name,
        quantizer=quantizer or kind.quantizer(base),
        **layer_options,
    )
    return LayerUpdate(result.lora_A, result.lora_B, result.base_residual, result.history, fallback)


def _layer_options(
    module: nn.Module, method: str, options: dict, adapter_name: str, pooled: bool, seed: int, name: str
) -> dict:
    layer_options = dict(options)
    if pooled:  # A acts on pooled inputs: the layer's adapter knows the pool
        pool = getattr(module, "qalora_group_size", {}).get(adapter_name)
        if pool is None and "group_size" not in layer_options:
            raise QuailoraInputError(
                f"layer {name}: a pooled (QA-LoRA) method needs a pooled adapter (LoraConfig use_qalora=True)"
            )
        layer_options.setdefault("group_size", pool)
    return effective_init_options(method, layer_options, layer_seed(seed, name))


def layer_seed(seed: int, name: str) -> int:
    """A stable 31-bit seed per (trial seed, layer name); crc32 rather than hash(), which is salted per process."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def apply_adapters(
    model: nn.Module,
    updates: dict[str, LayerUpdate],
    adapter_name: str = "default",
    weights: WeightSource | None = None,
) -> None:
    """Write computed adapters into the model, in place; a method that moved Q re-quantizes the base layer
    from W − L·R, W read from ``weights`` one layer at a time (needed only then)."""
    modules = dict(model.named_modules())
    if weights is None and any(u.base_residual is not None for u in updates.values()):
        raise QuailoraInputError("apply_adapters: these updates re-quantize base layers; pass weights=")
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
            if update.base_residual is not None:
                base = module.get_base_layer()
                weight = weights.get(
                    f"{checkpoint_name(name)}.weight", device=module.lora_A[adapter_name].weight.device
                )
                base_layer_kind(base, name).requantize(base, rebuilt_base(weight, update.base_residual))


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
    apply_adapters(model, updates, adapter_name, weights)
    return updates


ADAPTERS_FILE = "adapters.safetensors"
HISTORY_FILE = "history.json"
UNCALIBRATED_FILE = "uncalibrated.json"
_FIELDS = ("lora_A", "lora_B", "base_left", "base_right")


def save_updates(updates: dict[str, LayerUpdate], out_dir: str | Path) -> None:
    """Write per-layer updates as one safetensors file (``<layer>::lora_A`` ...) plus their histories."""
    out = Path(out_dir)
    tensors = {}
    for name, update in updates.items():
        residual = update.base_residual or (None, None)
        for field_name, tensor in zip(_FIELDS, (update.lora_A, update.lora_B, *residual), strict=True):
            if tensor is not None:
                tensors[f"{name}::{field_name}"] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, out / ADAPTERS_FILE)
    (out / HISTORY_FILE).write_text(json.dumps({name: u.history for name, u in updates.items()}))
    (out / UNCALIBRATED_FILE).write_text(json.dumps(sorted(n for n, u in updates.items() if u.uncalibrated)))


def load_updates(in_dir: str | Path) -> dict[str, LayerUpdate]:
    """The updates ``save_updates`` wrote, on the CPU."""
    src = Path(in_dir)
    tensors = load_file(src / ADAPTERS_FILE)
    histories = json.loads((src / HISTORY_FILE).read_text())
    uncalibrated_file = src / UNCALIBRATED_FILE  # absent in entries written before the fallback existed
    uncalibrated = set(json.loads(uncalibrated_file.read_text())) if uncalibrated_file.is_file() else set()
    updates = {}
    for name, history in histories.items():
        left, right = tensors.get(f"{name}::base_left"), tensors.get(f"{name}::base_right")
        updates[name] = LayerUpdate(
            tensors[f"{name}::lora_A"],
            tensors[f"{name}::lora_B"],
            (left, right) if left is not None else None,
            history,
            name in uncalibrated,
        )
    return updates


BASE_RESIDUALS_FILE = "base_residuals.safetensors"


def save_base_residuals(updates: dict[str, LayerUpdate], out_dir: str | Path) -> bool:
    """Write only what rebuilds a changed base (``<layer>::base_left``, ``::base_right``; peft layer names):
    with the full-precision checkpoint, quant(W − L·R) is each changed layer's Q. False if nothing changed."""
    tensors = {
        f"{name}::{field_name}": tensor.detach().to("cpu").contiguous()
        for name, update in updates.items()
        if update.base_residual is not None
        for field_name, tensor in zip(_FIELDS[2:], update.base_residual, strict=True)
    }
    if tensors:
        save_file(tensors, Path(out_dir) / BASE_RESIDUALS_FILE)
    return bool(tensors)


def load_base_residuals(in_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft layer name -> (L, R) from ``save_base_residuals``."""
    tensors = load_file(Path(in_dir) / BASE_RESIDUALS_FILE)
    names = {key.rsplit("::", 1)[0] for key in tensors}
    return {name: (tensors[f"{name}::base_left"], tensors[f"{name}::base_right"]) for name in names}
