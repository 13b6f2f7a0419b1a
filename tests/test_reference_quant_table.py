"""The quantization table loads each column through its quantizer's backend: the group-wise columns
quantize every decoder linear layer and leave the head alone."""

import torch
from transformers import AutoModelForCausalLM

from quailora.quantizers import get_quantizer
from quailora.quantizers.groupwise.layer import GroupwiseLinear
from reference.quant_table import GROUP_SIZE, PRECISIONS, markdown
from testkit.micro import make_micro_config


def test_int_column_quantizes_every_linear_but_the_head(tmp_path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_micro_config("llama", hidden=64, vocab=128)).save_pretrained(
        tmp_path
    )
    before = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model = PRECISIONS.get(f"INT2 g{GROUP_SIZE}")(tmp_path)
    quantizer = get_quantizer("int", bits=2, group_size=GROUP_SIZE)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GroupwiseLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name, layer in layers:
        original = before.get_submodule(name).weight.detach()
        assert layer.bits == 2 and torch.equal(layer.dequantize(), quantizer.fake_quantize(original)), name
    assert torch.equal(model.get_output_embeddings().weight, before.get_output_embeddings().weight)
    assert torch.equal(model.get_input_embeddings().weight, before.get_input_embeddings().weight)


def test_markdown_reports_relative_change_against_fp32() -> None:
    row = {"unigram": 700.0, "fp32": 100.0, "bnb 8-bit": 100.0, "bnb NF4": 101.0,
           "INT4 g64": 102.0, "INT3 g64": 110.0, "INT2 g64": 200.0}  # fmt: skip
    text = markdown({"pretrain-validation": {"llama-tiny": row}}, 16384, "python -m reference.quant_table")
    assert "| llama-tiny | 700.0 | 100.00 | 100.00 (+0.00%) | 101.00 (+1.00%) |" in text
    assert "200.00 (+100.00%) |" in text and "`python -m reference.quant_table`" in text
