"""The streamed group-wise INT-k loader gives the model that quantizing a fully loaded one gives, for every
supported architecture, without ever holding the full-precision model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quailora.architectures import prepare
from quailora.quantizers.groupwise.layer import GroupwiseLinear, quantize_model_groupwise
from quailora.quantizers.groupwise.loading import load_groupwise_model
from quailora.supported_architectures import SUPPORTED
from testkit.micro import make_micro_checkpoint

CPU = torch.device("cpu")
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _whole_then_quantized(checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """The former trial path: the whole model in full precision, then every linear but the head quantized."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    prepare(model)
    return quantize_model_groupwise(model, 4, 16).eval()


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, torch.float32) for name in sorted(SUPPORTED)] + [("llama3", torch.bfloat16)],
)
def test_streamed_load_equals_quantizing_the_whole_model(name, dtype, tmp_path):
    checkpoint = make_micro_checkpoint(name, tmp_path / "ckpt")
    expected = _whole_then_quantized(checkpoint, dtype)
    streamed = load_groupwise_model(checkpoint, 4, 16, dtype=dtype, device=CPU)
    assert (
        sum(isinstance(m, GroupwiseLinear) for m in streamed.modules())
        == sum(isinstance(m, GroupwiseLinear) for m in expected.modules())
        > 0
    )
    want, got = expected.state_dict(), streamed.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    if expected.get_output_embeddings().weight is expected.get_input_embeddings().weight:
        assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    assert not streamed.training
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=IDS).logits, expected(input_ids=IDS).logits)
