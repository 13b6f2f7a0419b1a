"""Everything quailora needs about a causal LM, derived from its modules rather than written in tables.

The decoder layers are the ModuleList of ``num_hidden_layers`` blocks; the linear layers are nn.Linear
(bitsandbytes and Falcon's subclasses included) and GPT-2's Conv1D; non-persistent buffers (rotary tables,
Gemma's embedding scale) are rebuilt by the model's own ``_init_weights``. What cannot be derived lives in
one ``Architecture`` per file of this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from quailora.architectures.experts import LinearExperts, is_fused_experts
from quailora.architectures.spec import ARCHITECTURES, Architecture
from quailora.errors import QuailoraInputError

PEFT_PREFIX = "base_model.model."


def architecture(model_type: str) -> Architecture:
    """The registered facts of ``model_type``; an unregistered type gets none (everything derived)."""
    return ARCHITECTURES.get(model_type) if model_type in ARCHITECTURES else Architecture()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); Conv1D stores its weight as (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def check_causal_lm(config: PretrainedConfig, where: str) -> None:
    """Refuse, naming the model_type, what AutoModelForCausalLM cannot build or has no decoder layers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QuailoraInputError(
            f"{where}: model_type {config.model_type!r} is not a decoder-only causal LM "
            "(transformers' AutoModelForCausalLM has no class for it)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise QuailoraInputError(f"{where}: model_type {config.model_type!r} is an encoder-decoder model")
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise QuailoraInputError(
            f"{where}: model_type {config.model_type!r}: its config has no num_hidden_layers"
        )


def load_model_config(checkpoint: str | Path, where: str) -> PretrainedConfig:
    """The checkpoint's config, checked to be a decoder-only causal LM, before any weight is read."""
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (ValueError, KeyError, OSError) as err:  # unknown model_type, broken or missing config.json
        raise QuailoraInputError(f"{where}: transformers cannot read its config: {err}") from None
    check_causal_lm(config, where)
    return config


def find_layers(model: nn.Module) -> str:
    """Path of the ModuleList holding the model's ``num_hidden_layers`` decoder layers."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == count
            and not isinstance(module, LinearExperts)
        ):
            return name
    raise QuailoraInputError(
        f"model_type {model.config.model_type!r}: no ModuleList of num_hidden_layers={count} decoder layers in "
        f"{type(model).__name__}"
    )


def prepare(model: nn.Module, arch: Architecture | None = None) -> set[str]:
    """Make every projection an nn.Linear of weight (out, in), in place, on any device (meta included):
    Conv1D becomes nn.Linear (its weight transposed) and fused experts become LinearExperts.
    Returns the names of the converted Conv1D modules (their checkpoint weights are (in, out))."""
    arch = arch or architecture(model.config.model_type)
    transposed = set()
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(module, Conv1D):
            linear = nn.Linear(*linear_shape(module), device=module.weight.device, dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.detach().T, requires_grad=module.weight.requires_grad)
            linear.bias = module.bias
            setattr(parent, child, linear)
            transposed.add(name)
        elif is_fused_experts(module) and not isinstance(module, LinearExperts):
            if arch.experts is None:
                raise QuailoraInputError(
                    f"model_type {model.config.model_type!r}: {name} is a fused experts module "
                    f"({type(module).__name__}); add its per-expert checkpoint names (ExpertNames) in "
                    f"quailora/architectures/{model.config.model_type}.py"
                )
            setattr(parent, child, LinearExperts(module, arch.experts, name))
    return transposed


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's modules on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def rebuild_buffers(
    model: nn.Module, module: nn.Module, device: str | torch.device = "cpu", *, recurse: bool = True
) -> None:
    """Materialize the non-persistent buffers (rotary tables, embedding scales) of ``module`` (and of its
    children with ``recurse``) on ``device`` from the config, with the model's own initializer: they are
    not in checkpoints. The module's parameters become uninitialized; load them afterwards."""
    for sub in module.modules() if recurse else [module]:
        if sub._non_persistent_buffers_set and any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.to_empty(device=device, recurse=False)
            with torch.no_grad():
                model._init_weights(sub)


@dataclass
class Layout:
    """A model's decoder layers and linear layers, derived from its (prepared) modules."""

    model: nn.Module
    arch: Architecture
    layers_path: str
    transposed: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, model: nn.Module, *, prepared: set[str] | None = None) -> Layout:
        """The layout of ``model``; prepares it (in place) unless ``prepared`` gives prepare's result."""
        arch = architecture(model.config.model_type)
        transposed = prepare(model, arch) if prepared is None else prepared
        return cls(model, arch, find_layers(model), transposed)

    @classmethod
    def from_config(cls, config: PretrainedConfig | str) -> Layout:
        config = AutoConfig.from_pretrained(config) if isinstance(config, str) else config
        check_causal_lm(config, "model")
        return cls.of(meta_model(config))

    @property
    def num_layers(self) -> int:
        return len(self.model.get_submodule(self.layers_path))

    def layer_name(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def layer_index(self, name: str) -> int | None:
        """Decoder-layer index of module ``name`` (peft's ``base_model.model.`` prefix allowed), None for a
        module outside the decoder layers; a name that is no module of the model is an error."""
        bare = name.removeprefix(PEFT_PREFIX)
        prefix = self.layers_path + "."
        if not bare.startswith(prefix):
            try:
                self.model.get_submodule(bare)
            except AttributeError:
                raise QuailoraInputError(
                    f"{name!r} is no module of the {self.model.config.model_type} model"
                ) from None
            return None
        index = bare[len(prefix) :].split(".", 1)[0]
        if not index.isdigit() or int(index) >= self.num_layers:
            raise QuailoraInputError(
                f"module {name!r}: {index!r} is not a decoder layer of {self.layers_path}"
            )
        return int(index)

    def is_router(self, name: str) -> bool:
        return any(name.endswith("." + suffix) for suffix in self.arch.routers)

    def linears(self, index: int | None = None) -> dict[str, tuple[int, int]]:
        """Full name -> (in, out) of every linear layer inside decoder layer ``index`` (all layers if None)."""
        root = self.layers_path if index is None else self.layer_name(index)
        return {
            f"{root}.{name}": linear_shape(module)
            for name, module in self.model.get_submodule(root).named_modules()
            if is_linear(module)
        }

    def checkpoint_key(self, key: str) -> str:
        """The checkpoint's key for the model's state-dict ``key`` (before any base-model prefix strip)."""
        for module_part, stored_part in self.arch.checkpoint_renames:
            key = key.replace(module_part, stored_part)
        return key

    def stored_transposed(self, key: str) -> bool:
        """Whether the checkpoint holds ``key`` (a converted Conv1D weight) as (in, out)."""
        module, _, leaf = key.rpartition(".")
        return leaf == "weight" and module in self.transposed
