"""Everything about a trial that can be checked without compute, checked in the driver before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quailora.api import validate_options
from quailora.architectures import Layout, load_model_config
from quailora.errors import QuailoraInputError
from quailora.initializers import adapter_kind, changes_base, needs_gram, zero_product
from quailora.peft_init import validate_lora_targets
from quailora.quantizers import quantizer_spec
from reference.cache import resolve_model
from trials.adapters import check_adapter_kind
from trials.config import TrialConfig, check_resources
from trials.evaluation import lm_eval_tasks
from trials.quantized_model import check_quantization
from trials.sources import check_data


@dataclass(frozen=True)
class TrialPlan:
    """What validation learned and the workers reuse: where the checkpoint is and which layers get LoRA."""

    checkpoint: Path
    target_names: list[str]
    model_type: str
    num_parameters: int


def _check_init(config: TrialConfig) -> None:
    """init.options must be the method's options, in their domains. A QA-LoRA method's group_size is its
    adapter's pooling group, quant.group_size: any other value would fail only mid-compute."""
    method = config.init.method
    options = dict(config.init.options)
    if adapter_kind(method) == "pooled":
        group_size = options.setdefault("group_size", config.quant.group_size)
        if group_size != config.quant.group_size:
            raise QuailoraInputError(
                f"init.options.group_size={group_size!r} differs from quant.group_size={config.quant.group_size}, "
                f"the pooling group of the adapter method {method!r} initializes; leave it out"
            )
    validate_options(method, options, where=f"init.options (method {method!r})")


def _check_zero_start(config: TrialConfig) -> None:
    """init.zero_start (quailora/zero_start.py) needs a plain adapter that starts with a correction, on the
    checkpoint's own quantized base, and no LoRA dropout."""
    if not config.init.zero_start:
        return
    method = config.init.method
    if adapter_kind(method) == "pooled":
        raise QuailoraInputError(
            f"init.zero_start: not supported for the pooled (QA-LoRA) adapter of init.method={method!r}"
        )
    if changes_base(method):
        raise QuailoraInputError(
            f"init.zero_start: not supported for init.method={method!r}, which re-quantizes the base it "
            "goes with (the zero-correction control is for methods on the checkpoint's own quantized base)"
        )
    if config.lora.dropout:
        raise QuailoraInputError(
            f"init.zero_start needs lora.dropout: 0, got {config.lora.dropout}: the trainable adapter and the "
            "frozen one that cancels it would draw different dropout masks, so the model would not start at Q"
        )
    if zero_product(method):
        raise QuailoraInputError(
            f"init.zero_start: init.method={method!r} starts its adapter at zero already (B·A = 0), so there "
            "is no initial correction to cancel; it is for methods that start with one (svd, quailora, ...)"
        )


def _check_group_size(model: torch.nn.Module, config: TrialConfig) -> None:
    """A quantizer that reads quant.group_size (group-wise INT-k) takes every linear layer but the head, so
    each must split into groups."""
    if "group_size" not in quantizer_spec(config.quant.method).settings:
        return
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module is not head
            and module.in_features % config.quant.group_size
        ):
            raise QuailoraInputError(
                f"layer {name}: in_features={module.in_features} is not divisible by "
                f"quant.group_size={config.quant.group_size}"
            )


def _check_pooled_rank(model: torch.nn.Module, names: list[str], config: TrialConfig) -> None:
    """QA-LoRA's lora_A reads one pooled value per group, so its rank is bounded by in_features/group_size."""
    if adapter_kind(config.init.method) != "pooled":
        return
    modules = dict(model.named_modules())
    for name in names:
        limit = min(modules[name].out_features, modules[name].in_features // config.quant.group_size)
        if config.lora.rank > limit:
            raise QuailoraInputError(
                f"layer {name}: lora.rank={config.lora.rank} exceeds min(out_features, in_features / "
                f"quant.group_size)={limit} for QA-LoRA method {config.init.method!r}"
            )


def validate_trial(config: TrialConfig) -> TrialPlan:
    """Raise QuailoraInputError naming the field and value for any bad input; no weights are read."""
    check_resources(config.resources)
    _check_init(config)
    _check_zero_start(config)
    check_quantization(config.quant)
    check_adapter_kind(config)
    checkpoint = resolve_model(config.model.path)
    model_config = load_model_config(checkpoint, f"model.path={config.model.path!r}")
    layout = Layout.from_config(model_config)  # shapes only, on meta: refuses what cannot be supported
    model = layout.model
    names = validate_lora_targets(
        model, config.lora.target_modules, config.lora.rank, exclude=layout.is_router
    )
    _check_group_size(model, config)
    _check_pooled_rank(model, names, config)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    lengths = {"data.seq_len": config.data.seq_len}
    if needs_gram(config.init.method):  # calibration only runs for calibrated methods
        lengths["calibration.seq_len"] = config.calibration.seq_len
    for field, seq_len in lengths.items():
        if max_positions is not None and seq_len > max_positions:
            raise QuailoraInputError(
                f"{field}={seq_len} exceeds the model's max_position_embeddings={max_positions}"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except Exception as err:  # any failure here means the checkpoint has no usable tokenizer
        raise QuailoraInputError(
            f"model.path={config.model.path!r}: no usable tokenizer in {checkpoint}: {err}"
        ) from None
    for field in ("data.train", "data.validation", "data.test"):
        source = getattr(config.data, field.split(".")[1])
        if source is not None:
            check_data(tokenizer, source, field, config.data.template, config.data.text_field)
    if needs_gram(config.init.method):
        check_data(
            tokenizer,
            config.calibration.dataset,
            "calibration.dataset",
            "text",
            config.calibration.text_field,
        )
    if config.eval.lm_eval_tasks:
        lm_eval_tasks(config.eval.lm_eval_tasks)
    return TrialPlan(checkpoint, names, model_config.model_type, sum(p.numel() for p in model.parameters()))
