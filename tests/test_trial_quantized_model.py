"""The trial's quantized bases: what gets quantized, and a model size that counts the quantization state."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from transformers import AutoModelForCausalLM

from quailora.quantizers.groupwise.layer import GroupwiseLinear
from testkit.micro import micro_trial_config
from trials.quantized_model import load_quantized_model, serialized_size_mb

CPU = torch.device("cpu")


def _params_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


@pytest.mark.parametrize(("quant", "layer_type"), [
    ({"method": "nf4", "bits": 4}, Linear4bit),
    ({"method": "int8", "bits": 8}, Linear8bitLt),
    ({"method": "int", "bits": 3, "group_size": 32}, GroupwiseLinear),
])  # fmt: skip
def test_every_linear_but_the_head_is_quantized_whatever_the_lora_targets(micro_trial, quant, layer_type):
    config = micro_trial_config(*micro_trial, quant=quant, lora={"target_modules": ["q_proj"]})
    model = load_quantized_model(micro_trial[0], config, torch.float32, CPU)
    quantized = [n for n, m in model.named_modules() if isinstance(m, layer_type)]
    assert len(quantized) == 2 * 7
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def test_model_size_counts_the_quantization_state(micro_trial):
    fp32 = AutoModelForCausalLM.from_pretrained(micro_trial[0])
    head = fp32.get_output_embeddings()
    linear_weights = [
        m.weight.numel() for m in fp32.modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    assert serialized_size_mb(fp32) == pytest.approx(_params_mb(fp32))  # plain model: its parameters

    config = micro_trial_config(*micro_trial, quant={"method": "int", "bits": 4, "group_size": 32})
    groupwise = serialized_size_mb(load_quantized_model(micro_trial[0], config, torch.float32, CPU))
    # 4-bit codes plus a float16 scale and a float32 zero per group of 32, instead of 4 bytes per weight
    expected = serialized_size_mb(fp32) - sum(n * (4 - 0.5 - 6 / 32) for n in linear_weights) / 2**20
    assert groupwise == pytest.approx(expected, rel=1e-6)

    nf4 = load_quantized_model(micro_trial[0], micro_trial_config(*micro_trial), torch.float32, CPU)
    assert (
        _params_mb(nf4) < serialized_size_mb(nf4) < serialized_size_mb(fp32)
    )  # absmax etc. are not parameters
