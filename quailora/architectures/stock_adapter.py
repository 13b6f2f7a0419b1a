"""A split-experts adapter rewritten for transformers' own (fused) MoE model and stock peft.

A trial adapts each expert's projections as nn.Linear modules (``experts.py``), so its adapter names
``<experts>.<e>.gate_proj`` and so on. transformers 5 holds the experts fused in 3-D parameters, and peft
0.21 rewrites such per-expert adapters for the fused model itself only where its own table knows the
model type, and then wrongly (measured on the micro models, tests/test_architectures.py):

- gpt_oss: no conversion at all (its checkpoints store the experts fused): the expert adapters match no
  module and are dropped without an error;
- qwen2_moe: peft's table has no entry for qwen2_moe itself (only qwen3_moe, olmoe, deepseek_v3 point at
  it), so the config is not rewritten while the weights are, and the expert adapters are dropped;
- deepseek_v3 (any type peft maps onto qwen2_moe's or mixtral's table): every ``gate_proj``/``up_proj``/
  ``down_proj`` target is rewritten onto the fused experts, also the dense first layers' MLP and the
  shared experts, which then lose their adapter.

``stock_adapter`` writes the adapter in the form stock peft loads as is, on every MoE type: the experts'
adapters as peft's own LoRA on the fused parameters (``target_parameters``; per expert, gate and up
stacked into one rank-2r update, block-diagonal B with its rows in the module's gate/up layout, concatenated
or interleaved; ``down_proj`` as it is), every other adapted linear named in full, those whose leaf name
peft would rewrite onto the experts as ``target_parameters`` on their ``.weight`` (peft's 2-D
ParamWrapper computes W + sBA like its Linear). The update of every projection is unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quailora.architectures.derive import PEFT_PREFIX, Layout
from quailora.architectures.experts import LinearExperts
from quailora.errors import QuailoraInputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _remapped_leaves(model_type: str) -> set[str]:
    """The leaf names peft 0.21 rewrites onto fused experts for ``model_type`` when loading an adapter."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_FUSED_TARGETS,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:  # a peft without the v5 conversion
        return set()
    base = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    if base is None or not _MOE_FUSED_TARGETS.get(base):
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(base, {}))


def _fused_factors(
    experts: LinearExperts, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], param: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """peft's (lora_A, lora_B, rank per expert) for fused parameter ``param`` from each expert's
    ``role -> (A (r, in), B (out, r))``; ``factors`` is keyed ``f"{expert}.{role}"``."""
    roles = [role for role, (p, _, _) in experts.layout.items() if p == param]
    a_stack, b_stack = [], []
    for e in range(experts.num_experts):
        parts = [factors[f"{e}.{role}"] for role in roles]
        rank = sum(a.shape[0] for a, _ in parts)
        out = sum(b.shape[0] for _, b in parts)
        b_fused = parts[0][1].new_zeros(out, rank)
        col = 0
        for role, (a, b) in zip(roles, parts, strict=True):
            rows = experts.layout[role][1]
            b_fused[rows, col : col + a.shape[0]] = b
            col += a.shape[0]
        a_stack.append(torch.cat([a for a, _ in parts]))
        b_stack.append(b_fused)
    # peft's ParamWrapper reads lora_A as (experts * rank, in), expert first, and lora_B as
    # (out, rank * experts), expert last
    a_all = torch.stack(a_stack)  # (experts, rank, in)
    b_all = torch.stack(b_stack)  # (experts, out, rank)
    rank = a_all.shape[1]
    return (
        a_all.reshape(-1, a_all.shape[-1]).contiguous(),
        b_all.permute(1, 2, 0).reshape(b_all.shape[1], -1).contiguous(),
        rank,
    )


def stock_adapter(adapter: str | Path, model: str | Path, out: str | Path) -> Path:
    """Write ``adapter`` (a peft LoRA adapter of ``model``'s split experts, as a trial saves it) into ``out``
    so that stock peft loads it on ``AutoModelForCausalLM.from_pretrained(model)``; a model without fused
    experts gets the adapter copied as is."""
    adapter, out = Path(adapter), Path(out)
    layout = Layout.from_config(str(model))
    experts = layout.experts()
    if not experts:
        shutil.copytree(adapter, out)
        return out
    config = json.loads((adapter / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_qalora"):
        raise QuailoraInputError(
            f"{adapter}: only plain LoRA adapters can be rewritten for the fused experts"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("target_parameters"):
        raise QuailoraInputError(
            f"{adapter}: rank_pattern, alpha_pattern or target_parameters already set; a trial's adapter has none"
        )
    state = load_file(adapter / WEIGHTS_FILE)
    factors: dict[str, dict[str, list]] = {}  # module -> {"A": tensor, "B": tensor}
    for key, tensor in state.items():
        module, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".")
        module, _, which = module.rpartition(".")
        if leaf != "weight" or which not in ("lora_A", "lora_B"):
            raise QuailoraInputError(f"{adapter}: tensor {key!r} is no LoRA A or B weight")
        factors.setdefault(module, {})[which[-1]] = tensor

    remapped = _remapped_leaves(layout.model.config.model_type)
    r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    new_state: dict[str, torch.Tensor] = {}
    target_modules, target_parameters, rank_pattern, alpha_pattern = [], [], {}, {}
    for name, module in experts.items():
        mine = {}
        for e in range(module.num_experts):
            for role, leaf in module.names.items():
                pair = factors.pop(f"{name}.{e}.{leaf}", None)
                if pair is not None:
                    mine[f"{e}.{role}"] = (pair["A"], pair["B"])
        adapted = []  # the fused parameters with an adapter, in the module's order
        for param in module.fused_params:
            roles = [role for role, (p, _, _) in module.layout.items() if p == param]
            present = [f"{e}.{role}" in mine for e in range(module.num_experts) for role in roles]
            if all(present) and present:
                adapted.append(param)
            elif any(present):
                raise QuailoraInputError(
                    f"{adapter}: {name}: some experts' {'/'.join(module.names[r] for r in roles)} are adapted, "
                    f"not all; the fused {param} takes one adapter for every expert"
                )
        # peft nests one ParamWrapper per parameter, the first in the module's order innermost
        for depth, param in enumerate(adapted):
            lora_a, lora_b, rank = _fused_factors(module, mine, param)
            where = ".base_layer" * (len(adapted) - 1 - depth)
            new_state[f"{PEFT_PREFIX}{name}{where}.lora_A.weight"] = lora_a
            new_state[f"{PEFT_PREFIX}{name}{where}.lora_B.weight"] = lora_b
            target_parameters.append(f"{name}.{param}")
            if rank != r:  # gate and up stacked: rank 2r, alpha chosen so that the scaling stays
                rank_pattern[rf".*\.{param}"] = rank
                alpha_pattern[rf".*\.{param}"] = alpha * (math.sqrt(rank / r) if rslora else rank / r)
    for name, pair in factors.items():
        if any(name.startswith(f"{e}.") for e in experts):
            raise QuailoraInputError(f"{adapter}: {name} is no projection of its experts module")
        new_state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pair["A"]
        new_state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pair["B"]
        if name.rpartition(".")[2] in remapped:  # peft would move a target of this name onto the experts
            target_parameters.append(f"{name}.weight")
        else:
            target_modules.append(name)
    config.update(
        target_modules=sorted(target_modules),
        target_parameters=sorted(target_parameters),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,  # peft's ParamWrapper refuses dropout (none at inference anyway)
    )
    out.mkdir(parents=True, exist_ok=True)
    for item in adapter.iterdir():
        if item.name not in (CONFIG_FILE, WEIGHTS_FILE) and item.is_file():
            shutil.copyfile(item, out / item.name)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(new_state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    return out
