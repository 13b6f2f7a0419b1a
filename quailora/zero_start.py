"""Zero-correction start: an init method's adapter trains from its own factors while the model starts at Q.

A control for "is an init's lead the correction it starts with, or the optimization its factors give?".
After the method's (A0, B0) are the trainable adapter ("default"), a second peft LoRA adapter ("start") on
the same layers, with the same rank, alpha and rsLoRA (so the same scaling s), holds lora_A = A0 and
lora_B = −B0 and stays frozen. Both are active, so every layer computes Q·x + s·B·A·x − s·B0·A0·x: at step 0
the two products cancel and the model is its quantized base (up to the rounding of adding and removing the
same term), while the trainable adapter and its optimizer see exactly the method's factors. LoRA dropout
must be 0: each adapter draws its own dropout mask, and the two terms would no longer cancel.

Everything is peft's own: ``add_adapter``, ``set_adapter`` with both names, and for a stock-loadable result
``add_weighted_adapter(..., combination_type="cat")``, one adapter of rank 2r equal to the sum of the two.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from quailora.architectures.experts import peft_sees_split_experts
from quailora.errors import QuailoraInputError

START_ADAPTER = "start"  # the frozen adapter that cancels the trainable one's initial product
COMBINED_ADAPTER = "zero_start_combined"  # both as one rank-2r adapter (combine_zero_start)


def _layers(model: PeftModel, adapter: str) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def start_parameters(model: PeftModel, start: str = START_ADAPTER) -> list[torch.nn.Parameter]:
    """The frozen start adapter's parameters (lora_A and lora_B of every layer)."""
    return [
        p for layer in _layers(model, start) for p in (layer.lora_A[start].weight, layer.lora_B[start].weight)
    ]


def add_zero_start(model: PeftModel, adapter: str = "default", start: str = START_ADAPTER) -> None:
    """Add the frozen adapter ``start`` = (A0, −B0) of ``adapter``'s current factors and activate both, in
    place: the model's output becomes its base's, ``adapter`` stays the only trainable parameters."""
    # the same rank, alpha, rsLoRA and targets (and custom layer types)
    config = copy.deepcopy(model.peft_config[adapter])
    if config.lora_dropout:
        raise QuailoraInputError(
            f"zero start needs lora dropout 0, got {config.lora_dropout}: the two adapters would draw "
            "different dropout masks and their products would not cancel"
        )
    layers = _layers(model, adapter)
    with peft_sees_split_experts():
        model.add_adapter(start, config)
    started = _layers(model, start)
    if len(started) != len(layers):
        raise QuailoraInputError(
            f"zero start: peft put the {start!r} adapter on {len(started)} layers, {adapter!r} is on {len(layers)}"
        )
    with torch.no_grad():
        for layer in layers:
            layer.lora_A[start].weight.copy_(layer.lora_A[adapter].weight)
            layer.lora_B[start].weight.copy_(-layer.lora_B[adapter].weight)
    model.base_model.set_adapter([adapter, start])  # marks every active adapter trainable ...
    for param in start_parameters(model, start):  # ... so the start one is frozen again
        param.requires_grad_(False)


def combine_zero_start(
    model: PeftModel, adapter: str = "default", start: str = START_ADAPTER, name: str = COMBINED_ADAPTER
) -> None:
    """Add adapter ``name`` equal to ``adapter`` + ``start`` and make it the only active one, in place.

    peft's "cat" stacks the factors (rank 2r), folding each adapter's scaling into its lora_A rows, and gives
    the new adapter lora_alpha = r_new, a scaling of 1, so its delta is s·B·A + s·B0'·A0' exactly. It copies
    use_rslora from the first adapter, which would make that scaling r_new/sqrt(r_new): with rsLoRA the new
    adapter is set back to plain scaling (use_rslora False, scaling 1), as its saved config then says."""
    model.add_weighted_adapter([adapter, start], [1.0, 1.0], name, combination_type="cat")
    config = model.peft_config[name]
    if config.use_rslora:
        config.use_rslora = False
        for layer in _layers(model, name):
            layer.scaling[name] = config.lora_alpha / config.r
    model.base_model.set_adapter(name)


def save_combined(model: PeftModel, out_dir: str | Path, name: str = COMBINED_ADAPTER) -> Path:
    """Write the combined adapter as a stock peft adapter directory ``out_dir`` (loads as "default")."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        model.save_pretrained(staging, selected_adapters=[name], safe_serialization=True)
        Path(staging, name).rename(out)  # peft writes an adapter not named "default" into a subfolder
    return out


def load_start_adapter(
    model: PeftModel, adapter_dir: str | Path, adapter: str = "default", start: str = START_ADAPTER
) -> None:
    """Load a saved start adapter (a trial's adapter artifact holds it in its ``start/`` subfolder, where peft's
    save_pretrained writes a second adapter) into ``model`` beside ``adapter`` and activate both, as trained."""
    from quailora.qalora.adapter import register_groupwise  # the custom layer for group-wise INT-k bases

    config = register_groupwise(LoraConfig.from_pretrained(str(adapter_dir)))
    with peft_sees_split_experts():
        model.add_adapter(start, config)
        loaded = model.load_adapter(str(adapter_dir), adapter_name=start)
    if loaded.missing_keys:
        raise QuailoraInputError(f"{adapter_dir}: the start adapter lacks {loaded.missing_keys[:3]}")
    model.base_model.set_adapter([adapter, start])
    for param in start_parameters(model, start):
        param.requires_grad_(False)
