"""Fused MoE experts (3-D ``gate_up_proj``/``down_proj`` parameters) as one nn.Linear per projection and expert.

transformers 5 stores experts fused, which bitsandbytes does not quantize and peft's LoRA does not see as
linear layers. Unfused, each expert's projections are quantized, calibrated (a Gram over the tokens routed
to that expert) and adapted like any other linear layer. Everything is read from the fused module itself:
its parameters' shapes, and the layout flags transformers' ``use_experts_implementation`` sets on it
(transposed, gate/up concatenated or interleaved, biases, gated); the gating is the module's own
``_apply_gate`` (gpt-oss's clamped SwiGLU included), so outputs are those of the fused module.
The per-expert names are the checkpoint's, from transformers' conversion mapping where it has one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.conversion_mapping import extract_weight_conversions_for_model
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from quailora.errors import QuailoraInputError

# The projections' names where the checkpoint stores the experts fused (or transformers has no per-expert
# mapping): those of transformers' qwen2_moe-family mapping, which peft's MoE target mapping also knows.
DEFAULT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return any(p.ndim == 3 for p in params.values())


def _leaf(pattern: str) -> str:
    """``w1`` of ``.experts.*.w1.weight`` (escaped or not)."""
    return pattern.replace("\\", "").rsplit("*.", 1)[1].removesuffix(".weight")


def checkpoint_names(model: nn.Module, module_name: str) -> dict[str, str]:
    """The per-expert names (gate, up, down -> name) of the fused experts at ``module_name``: from the
    converter transformers loads them with (per-expert tensors merged on dim 0, gate then up concatenated),
    DEFAULT_NAMES where it has none (the checkpoint then stores them fused, read in slices)."""
    names = dict(DEFAULT_NAMES)
    for conversion in extract_weight_conversions_for_model(model) or []:
        if not isinstance(conversion, WeightConverter):
            continue
        target = conversion._original_target_patterns[0].replace("\\", "")
        sources, ops = conversion._original_source_patterns, conversion.operations
        merged = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
        if not merged or not all("*" in s for s in sources):
            continue
        if f"{module_name}.gate_up_proj".endswith(target) and len(sources) == 2 and len(ops) == 2:
            if isinstance(ops[1], Concatenate) and ops[1].dim == 1:
                names["gate"], names["up"] = _leaf(sources[0]), _leaf(sources[1])
        elif f"{module_name}.down_proj".endswith(target) and len(sources) == 1 and len(ops) == 1:
            names["down"] = _leaf(sources[0])
    return names


@dataclass(frozen=True)
class FusedSlice:
    """Where one expert projection lies in a fused parameter: ``param[expert]``, transposed if the module
    stores (in, out), then the rows of the projection (gate/up concatenated or interleaved)."""

    param: str
    expert: int
    transposed: bool
    rows: slice

    def __call__(self, fused: torch.Tensor) -> torch.Tensor:
        part = fused[self.expert]
        if self.transposed and part.ndim == 2:
            part = part.T
        return part[self.rows].contiguous()

    def shape(self, fused_shape: tuple[int, ...]) -> tuple[int, ...]:
        part = fused_shape[1:]
        if self.transposed and len(part) == 2:
            part = part[::-1]
        return (len(range(part[0])[self.rows]), *part[1:])


class LinearExperts(nn.ModuleList):
    """``experts.<e>.<gate|up|down>`` nn.Linear modules, named as in the checkpoint, computing like the fused module."""

    def __init__(self, fused: nn.Module, names: dict[str, str], where: str) -> None:
        params = dict(fused.named_parameters(recurse=False))
        gated = getattr(fused, "has_gate", "gate_up_proj" in params)
        first = "gate_up_proj" if gated else "up_proj"
        bias = getattr(fused, "has_bias", False)
        expected = {first, "down_proj"} | ({f"{first}_bias", "down_proj_bias"} if bias else set())
        if (
            set(params) != expected
            or getattr(fused, "has_post_expert_norm", False)
            or any(True for _ in fused.buffers(recurse=False))
            or not (hasattr(fused, "act_fn") or hasattr(fused, "_apply_gate"))
        ):
            raise QuailoraInputError(
                f"{where}: experts module {type(fused).__name__} has parameters {sorted(params)}; only fused "
                "gate_up_proj (or up_proj) and down_proj experts, with or without biases, can be split into "
                "linear layers"
            )
        super().__init__()
        self.param_order = list(params)  # transformers' order (peft nests its ParamWrappers in it)
        self.fused_params = [name for name in params if not name.endswith("_bias")]
        self.transposed = bool(getattr(fused, "is_transposed", False))
        self.concatenated = bool(getattr(fused, "is_concatenated", True))
        down = params["down_proj"]  # (experts, hidden, inter), or (experts, inter, hidden) transposed
        num_experts, hidden, inter = (
            down.shape[0],
            down.shape[1 + self.transposed],
            down.shape[2 - self.transposed],
        )
        width = params[first].shape[1 + self.transposed]  # 2 x inter if gated
        if self.concatenated:
            split = {"gate": slice(0, inter), "up": slice(inter, width)}
        else:
            split = {"gate": slice(0, width, 2), "up": slice(1, width, 2)}
        # projection -> (fused parameter, its rows in that parameter, in_features)
        self.layout = {"down": ("down_proj", slice(None), inter)}
        if gated:
            self.layout |= {role: (first, split[role], hidden) for role in ("gate", "up")}
        else:
            self.layout["up"] = (first, slice(None), hidden)
        self.names = {role: names[role] for role in self.layout}
        for e in range(num_experts):
            expert = nn.Module()
            for role, (param, rows, n_in) in self.layout.items():
                source, weight = self.slice(param, e, rows), params[param]
                linear = nn.Linear(
                    n_in,
                    source.shape(tuple(weight.shape))[0],
                    bias=bias,
                    device=weight.device,
                    dtype=weight.dtype,
                )
                if not weight.is_meta:
                    with torch.no_grad():
                        linear.weight.copy_(source(weight))
                        if bias:
                            linear.bias.copy_(source(params[f"{param}_bias"]))
                setattr(expert, self.names[role], linear)
            self.append(expert)
        self.num_experts = num_experts
        self.gated = gated
        for name in params:  # the shell keeps the gating (act_fn, _apply_gate), not the full weights
            delattr(fused, name)
        object.__setattr__(self, "_fused", fused)  # not a child: no parameters, nothing to move
        routing = list(inspect.signature(type(fused).forward).parameters)[2:4]
        self._routing = routing  # the names the fused forward gives the expert indices and weights

    def slice(self, param: str, expert: int, rows: slice) -> FusedSlice:
        return FusedSlice(param, expert, self.transposed, rows)

    def source(self, expert: int, name: str, leaf: str) -> FusedSlice | None:
        """Where ``experts.<expert>.<name>.<leaf>`` lies in the fused parameters, None if no such tensor."""
        role = next((r for r, n in self.names.items() if n == name), None)
        if role is None or leaf not in ("weight", "bias"):
            return None
        param, rows, _ = self.layout[role]
        return self.slice(param if leaf == "weight" else f"{param}_bias", expert, rows)

    def _project(self, expert: nn.Module, state: torch.Tensor) -> torch.Tensor:
        up = getattr(expert, self.names["up"])(state)
        if not self.gated:
            inner = self._fused.act_fn(up)
        else:
            gate = getattr(expert, self.names["gate"])(state)
            if not hasattr(self._fused, "_apply_gate"):  # an experts class transformers did not decorate
                return getattr(expert, self.names["down"])(self._fused.act_fn(gate) * up)
            # The module's own gating on the fused layout it expects (gate, up concatenated or interleaved).
            both = torch.cat([gate, up], -1) if self.concatenated else torch.stack([gate, up], -1).flatten(-2)
            inner = self._fused._apply_gate(both)
        return getattr(expert, self.names["down"])(inner)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = dict(zip(self._routing, args, strict=False)) | kwargs
        top_k_index, top_k_weights = (routing[name] for name in self._routing)
        final = torch.zeros_like(hidden_states)
        if hidden_states.is_meta:  # shapes only (memory planning): every expert sees every token
            for expert in self:
                final = final + self._project(expert, hidden_states)
            return final
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(
                2, 1, 0
            )
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[index])
            out = self._project(self[index], hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    @torch.no_grad()
    def fused(self, weight: Callable[[nn.Module], torch.Tensor] | None = None) -> nn.Module:
        """transformers' experts module again, its fused parameters filled from the expert linears: their
        ``weight(linear)`` (by default ``linear.weight``; a quantized linear's dequantized weight through
        ``weight``) and biases, in the module's own layout (transposed, gate/up concatenated or interleaved).
        The shell kept the gating; the parameters come back in their original order."""
        weight = weight or (lambda linear: linear.weight)
        tensors: dict[str, torch.Tensor] = {}
        for role, (param, rows, _) in self.layout.items():
            height = sum(
                getattr(self[0], self.names[r]).out_features
                for r, (q, _, _) in self.layout.items()
                if q == param
            )
            for e, expert in enumerate(self):
                linear = getattr(expert, self.names[role])
                for name, value in ((param, weight(linear)), (f"{param}_bias", linear.bias)):
                    if value is None:
                        continue
                    if name not in tensors:  # (experts, out, in) or (experts, out): transposed below
                        tensors[name] = value.new_zeros(len(self), height, *value.shape[1:])
                    tensors[name][e][rows] = value.detach()
        shell = self._fused
        for name in self.param_order:
            tensor = tensors[name]
            if self.transposed and tensor.ndim == 3:
                tensor = tensor.transpose(1, 2)
            shell.register_parameter(name, nn.Parameter(tensor.contiguous()))
        return shell


def split_experts(model: nn.Module) -> None:
    """Split every fused experts module of ``model`` into LinearExperts, in place (the experts part of
    ``quailora.architectures.prepare``, which also converts Conv1D)."""
    for name, module in list(model.named_modules()):
        if is_fused_experts(module) and not isinstance(module, LinearExperts):
            parent, _, child = name.rpartition(".")
            where = f"model_type {model.config.model_type!r}: {name}"
            setattr(
                model.get_submodule(parent),
                child,
                LinearExperts(module, checkpoint_names(model, name), where),
            )


def fuse_experts(model: nn.Module, weight=None) -> None:
    """Undo the split of ``prepare``, in place: every LinearExperts becomes transformers' fused module again
    (``LinearExperts.fused``), so that the model saves as transformers' own."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearExperts):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.fused(weight))


@contextmanager
def peft_sees_split_experts() -> Iterator[None]:
    """Build or load a peft adapter on a model whose experts are LinearExperts.

    peft 0.21 rewrites per-expert targets (transformers 4 names such as Mixtral's ``w1``/``w3``) into LoRA
    on transformers 5's fused 3-D expert parameters, which is what lets stock peft load these adapters on a
    stock transformers 5 model. On a model whose experts are split, those targets are real nn.Linear
    modules, so the rewrite (of the config, and of the weights when loading) is turned off meanwhile (peft
    offers no switch; its module functions are replaced).
    """
    from peft.utils import transformers_weight_conversion as conversion

    originals = {
        "_convert_peft_config_moe": lambda peft_config, model: None,
        "convert_peft_adapter_state_dict_for_transformers": lambda model, peft_config, adapter_state_dict, adapter_name="default": (
            adapter_state_dict
        ),
    }
    for name, replacement in list(originals.items()):
        originals[name] = getattr(conversion, name)
        setattr(conversion, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(conversion, name, original)
