"""init.zero_start (quailora/zero_start.py), in process on the micro NF4 model: the model starts at its quantized
base, only the method's adapter trains, and the exported rank-2r adapter is the two adapters' sum, also
through stock peft. The trial path (stages.prepare_model, checkpoints, resume) is in test_checkpointing.py,
the export command in test_export.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from quailora.architectures import ModelWeights
from quailora.errors import QuailoraInputError
from quailora.peft_init import initialize_peft_model
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.zero_start import (
    START_ADAPTER,
    add_zero_start,
    combine_zero_start,
    load_start_adapter,
    save_combined,
    start_parameters,
)
from testkit.micro import micro_trial_config
from trials.adapters import build_adapter
from trials.quantized_model import load_quantized_model
from trials.validation import validate_trial

CPU = torch.device("cpu")


def rel_max_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def svd_model(micro_trial, **lora):
    """The micro model, NF4, with svd's adapter on every linear layer, as a trial's initialize stage leaves it."""
    checkpoint, texts = micro_trial
    config = micro_trial_config(checkpoint, texts, lora={"rank": 4, "alpha": 8.0, **lora})
    base = load_quantized_model(checkpoint, config, torch.float32, CPU)
    model = build_adapter(base, config, validate_trial(config).target_names)
    exact_cpu_4bit(model)
    initialize_peft_model(model, "svd", ModelWeights(checkpoint))
    return config, model


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("use_rslora", [False, True])
def test_zero_start_starts_at_q_trains_only_the_method_adapter_and_exports_the_sum(
    micro_trial, tmp_path, use_rslora
):
    config, model = svd_model(micro_trial, use_rslora=use_rslora)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with model.disable_adapter():
        quantized = logits(model, ids)
    svd = logits(model, ids)
    assert rel_max_error(svd, quantized) > 1e-3  # svd's adapter starts with a correction

    add_zero_start(model)
    assert rel_max_error(logits(model, ids), quantized) <= 1e-6  # zero initial correction
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert len(trainable) == len(start_parameters(model)) and not any(
        p.requires_grad for p in start_parameters(model)
    )

    # one optimizer step: only the method's adapter moves
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved == {n for n in before if ".default." in n}
    trained = logits(model, ids)

    # saved as a trial logs it (peft: "start" in its own subfolder), reloaded, combined to one rank-2r adapter
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        load_quantized_model(micro_trial[0], config, torch.float32, CPU), tmp_path / "adapter"
    )
    exact_cpu_4bit(reloaded)
    load_start_adapter(reloaded, tmp_path / "adapter" / START_ADAPTER)
    assert rel_max_error(logits(reloaded, ids), trained) <= 1e-6
    combine_zero_start(reloaded)
    assert reloaded.active_adapters == ["zero_start_combined"]
    assert rel_max_error(logits(reloaded, ids), trained) <= 1e-6
    save_combined(reloaded, tmp_path / "combined")

    # stock peft on a stock load of a float base: the combined delta is the sum of the two adapters' deltas
    stock = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(micro_trial[0]), tmp_path / "combined"
    )
    assert (
        stock.peft_config["default"].r == 2 * config.lora.rank and not stock.peft_config["default"].use_rslora
    )
    layers, compared = dict(model.named_modules()), 0
    for name, layer in stock.named_modules():
        if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "lora_A", {}):
            ours = layers[name]
            expected = ours.get_delta_weight("default") + ours.get_delta_weight(START_ADAPTER)
            torch.testing.assert_close(layer.get_delta_weight("default"), expected, rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == len(start_parameters(model)) // 2  # every adapted layer


def test_zero_start_refuses_dropout(micro_trial):
    _, model = svd_model(micro_trial)
    model.peft_config["default"].lora_dropout = 0.1
    with pytest.raises(QuailoraInputError, match="dropout"):
        add_zero_start(model)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"init": {"method": "gaussian", "zero_start": True}}, "init.method='gaussian' starts its adapter at zero"),
        ({"init": {"method": "svd", "zero_start": True}, "lora": {"dropout": 0.1}}, "init.zero_start needs lora.dropout: 0"),
        ({"init": {"method": "loftq", "zero_start": True}}, "init.zero_start: not supported for init.method='loftq'"),
        (
            {"init": {"method": "qalora_zero", "zero_start": True}, "quant": {"method": "int", "bits": 4, "group_size": 16}},
            "init.zero_start: not supported for the pooled",
        ),
    ],
)  # fmt: skip
def test_validation_refuses_zero_start_where_it_means_nothing(micro_trial, overrides, needle):
    with pytest.raises(QuailoraInputError, match=needle):
        validate_trial(micro_trial_config(*micro_trial, **overrides))


def test_zero_start_is_a_param_only_where_set(micro_trial):
    from trials.tracking import config_from_params, flat_params, trial_key

    plain = micro_trial_config(*micro_trial)
    assert "zero_start" not in plain.model_dump_json()  # every other trial keeps its key
    zero = micro_trial_config(*micro_trial, init={"method": "svd", "zero_start": True})
    validate_trial(zero)
    params = flat_params(zero)
    assert params["init.zero_start"] == "True" and "init.zero_start" not in flat_params(plain)
    assert config_from_params(params) == zero and trial_key(zero) != trial_key(plain)
