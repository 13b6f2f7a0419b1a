"""Everything quailora needs about a causal LM, derived from its modules rather than written in tables.

The decoder layers are the ModuleList of ``num_hidden_layers`` blocks; the linear layers are nn.Linear
(bitsandbytes and Falcon's subclasses included) and GPT-2's Conv1D; non-persistent buffers (rotary tables,
Gemma's embedding scale) are rebuilt by the model's own ``_init_weights``; fused MoE experts are split
(``experts.py``), and the routers are the linears a MoE block holds beside its experts. The checkpoint's
names for the model's tensors come from transformers' own conversion mapping (the one ``from_pretrained``
loads with), resolved against the checkpoint's keys (``weights.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import extract_weight_conversions_for_model
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.pytorch_utils import Conv1D

from quailora.architectures.experts import LinearExperts, checkpoint_names, is_fused_experts
from quailora.errors import QuailoraInputError

PEFT_PREFIX = "base_model.model."


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


def prepare(model: nn.Module) -> set[str]:
    """Make every projection an nn.Linear of weight (out, in), in place, on any device (meta included):
    Conv1D becomes nn.Linear (its weight transposed) and fused experts become LinearExperts.
    Returns the names of the converted Conv1D modules (their checkpoint weights are (in, out))."""
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
            where = f"model_type {model.config.model_type!r}: {name}"
            setattr(parent, child, LinearExperts(module, checkpoint_names(model, name), where))
    return transposed


def find_routers(model: nn.Module) -> frozenset[str]:
    """The linears a MoE block holds directly beside its experts (qwen2_moe's ``shared_expert_gate``; the
    ``gate`` of transformers 4 MoE models): they route or weigh tokens, the experts' and shared experts'
    projections lie inside their own modules. transformers 5's own router modules are no nn.Linear."""
    return frozenset(
        f"{name}.{child}" if name else child
        for name, module in model.named_modules()
        if any(isinstance(m, LinearExperts) for m in module.children())
        for child, m in module.named_children()
        if is_linear(m)
    )


def checkpoint_renamings(model: nn.Module) -> list[WeightRenaming]:
    """transformers' renamings of checkpoint keys for this model (Mixtral's ``block_sparse_moe``, GPT-NeoX's
    ``embed_out``), reversed: model key -> the key checkpoints store it under."""
    conversions = extract_weight_conversions_for_model(model) or []
    return [c.reverse_transform() for c in conversions if isinstance(c, WeightRenaming)]


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
    layers_path: str
    transposed: set[str] = field(default_factory=set)
    routers: frozenset[str] = frozenset()
    renamings: list[WeightRenaming] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, *, prepared: set[str] | None = None) -> Layout:
        """The layout of ``model``; prepares it (in place) unless ``prepared`` gives prepare's result."""
        transposed = prepare(model) if prepared is None else prepared
        return cls(model, find_layers(model), transposed, find_routers(model), checkpoint_renamings(model))

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
        """Never adapted (``all-linear`` leaves it out): a low-rank update of a router moves the discrete
        top-k choice of experts, not a projection's output; it is quantized like the other linears, as
        transformers' bitsandbytes loading does (docs/architectures.md)."""
        return name.removeprefix(PEFT_PREFIX) in self.routers

    def linears(self, index: int | None = None) -> dict[str, tuple[int, int]]:
        """Full name -> (in, out) of every linear layer inside decoder layer ``index`` (all layers if None)."""
        root = self.layers_path if index is None else self.layer_name(index)
        return {
            f"{root}.{name}": linear_shape(module)
            for name, module in self.model.get_submodule(root).named_modules()
            if is_linear(module)
        }

    def checkpoint_key(self, key: str) -> str:
        """The legacy checkpoint key transformers renames to the model's state-dict ``key`` (``key`` itself
        if none; before any base-model prefix strip)."""
        return apply_renamings(key, self.renamings) if self.renamings else key

    def experts(self) -> dict[str, LinearExperts]:
        """Name -> split experts module."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LinearExperts)}

    def stored_transposed(self, key: str) -> bool:
        """Whether the checkpoint holds ``key`` (a converted Conv1D weight) as (in, out)."""
        module, _, leaf = key.rpartition(".")
        return leaf == "weight" and module in self.transposed
