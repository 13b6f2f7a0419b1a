"""The quantization table's group-wise path quantizes every decoder linear layer and leaves the head alone."""

import torch
from transformers import AutoModelForCausalLM

from reference.quant_table import GROUP_SIZE, fake_quantize_linears, markdown
from tests.micro_models import make_micro_config


def test_fake_quantize_linears_rounds_every_linear_but_the_head() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_micro_config("llama", hidden=64, vocab=128))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fake_quantize_linears(model, bits=2)
    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name, module in linears:
        weight = module.weight.detach()
        assert not torch.equal(weight, before[f"{name}.weight"]), name
        groups = weight.reshape(-1, GROUP_SIZE)
        assert max(len(torch.unique(g)) for g in groups) <= 4, name  # 2 bits: at most 4 levels per group
    assert torch.equal(head.weight, before["lm_head.weight"])
    assert torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])


def test_markdown_reports_relative_change_against_fp32() -> None:
    row = {"unigram": 700.0, "fp32": 100.0, "bnb 8-bit": 100.0, "bnb NF4": 101.0,
           "INT4 g64": 102.0, "INT3 g64": 110.0, "INT2 g64": 200.0}  # fmt: skip
    text = markdown({"pretrain-validation": {"llama-tiny": row}}, 16384, "python -m reference.quant_table")
    assert "| llama-tiny | 700.0 | 100.00 | 100.00 (+0.00%) | 101.00 (+1.00%) |" in text
    assert "200.00 (+100.00%) |" in text and "`python -m reference.quant_table`" in text
