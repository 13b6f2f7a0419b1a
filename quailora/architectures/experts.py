"""Fused MoE experts (3-D ``gate_up_proj``/``down_proj`` parameters) as one nn.Linear per projection and expert.

transformers 5 stores experts fused, which bitsandbytes does not quantize and peft's LoRA does not see as
linear layers. Unfused, each expert's projections are quantized, calibrated (a Gram over the tokens routed
to that expert) and adapted like any other linear layer; the computation is the eager loop of
transformers' own experts modules, so outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quailora.architectures.spec import ExpertNames
from quailora.errors import QuailoraInputError


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return any(p.ndim == 3 for p in params.values())


class LinearExperts(nn.ModuleList):
    """``experts.<e>.<gate|up|down>`` nn.Linear modules, named as in the checkpoint, computing like the fused module."""

    def __init__(self, fused: nn.Module, names: ExpertNames, where: str) -> None:
        params = dict(fused.named_parameters(recurse=False))
        if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(fused, "act_fn"):
            raise QuailoraInputError(
                f"{where}: experts module {type(fused).__name__} has parameters {sorted(params)}; only fused "
                "gate_up_proj/down_proj experts without biases can be split into linear layers"
            )
        gate_up, down = params["gate_up_proj"], params["down_proj"]
        num_experts, double_inter, hidden = gate_up.shape
        inter = double_inter // 2
        experts = []
        for e in range(num_experts):
            expert = nn.Module()
            shapes = {names.gate: (hidden, inter), names.up: (hidden, inter), names.down: (inter, hidden)}
            for name, (n_in, n_out) in shapes.items():
                setattr(
                    expert,
                    name,
                    nn.Linear(n_in, n_out, bias=False, device=gate_up.device, dtype=gate_up.dtype),
                )
            if not gate_up.is_meta:
                with torch.no_grad():
                    getattr(expert, names.gate).weight.copy_(gate_up[e, :inter])
                    getattr(expert, names.up).weight.copy_(gate_up[e, inter:])
                    getattr(expert, names.down).weight.copy_(down[e])
            experts.append(expert)
        super().__init__(experts)
        self.names = names
        self.num_experts = num_experts
        self.act_fn = fused.act_fn

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        if hidden_states.is_meta:  # shapes only (memory planning): every expert sees every token
            for expert in self:
                gate, up, down = (
                    getattr(expert, n) for n in (self.names.gate, self.names.up, self.names.down)
                )
                final = final + down(self.act_fn(gate(hidden_states)) * up(hidden_states))
            return final
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(
                2, 1, 0
            )
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == self.num_experts:
                continue
            expert = self[index]
            top_k_pos, token_idx = torch.where(expert_mask[index])
            state = hidden_states[token_idx]
            inner = self.act_fn(getattr(expert, self.names.gate)(state)) * getattr(expert, self.names.up)(
                state
            )
            out = getattr(expert, self.names.down)(inner) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


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
