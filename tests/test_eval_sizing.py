"""Evaluation sized for the cluster: perplexity's fp32 logits scored in bounded chunks (and the plan's `eval
logits` term of the same size), the default lm-eval limit for large models, the model's parameter count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig

import quailora.text as text
from orchestrator import memory
from orchestrator.model_shapes import ModelShape
from quailora.text import IGNORE_INDEX, perplexity
from testkit.micro import make_micro_config
from trials.config import LM_EVAL_LARGE_MODEL_LIMIT, LM_EVAL_LARGE_MODEL_PARAMETERS, EvalSpec, TrialConfig
from trials.evaluation import model_parameters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_micro_config("llama", vocab=300)).eval()


def _blocks():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (5, 24), generator=generator)
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # a prompt left out of the loss
    return ids, labels


@torch.no_grad()
def _unchunked(model, ids, labels, batch_size):
    """perplexity as it was before chunking: each batch's logits cast to fp32 whole."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        logits = model(input_ids=ids[start : start + batch_size]).logits[:, :-1].float()
        targets = labels[start : start + batch_size, 1:]
        loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
        nll += loss.sum(dim=1).double().sum().item()
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(nll / count)


def test_perplexity_scores_bounded_chunks_with_the_same_result(model, monkeypatch):
    ids, labels = _blocks()
    reference = {b: _unchunked(model, ids, labels, b) for b in (1, 2, 5)}
    whole = {b: perplexity(model, ids, b, "cpu", labels) for b in (1, 2, 5)}
    for b in reference:  # the same numbers to float rounding (a per-position (n, V) cross_entropy)
        assert whole[b] == pytest.approx(reference[b], rel=1e-6)

    scored: list[tuple[tuple[int, ...], torch.dtype]] = []
    cross_entropy = F.cross_entropy

    def recording(logits, *args, **kwargs):
        scored.append((tuple(logits.shape), logits.dtype))
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(text.F, "cross_entropy", recording)
    monkeypatch.setattr(text, "LOSS_CHUNK_BYTES", 5 * 8 * 300)  # 5 positions of fp32 logits and log-probs
    assert text.loss_chunk_positions(300) == 5
    for b in (1, 2, 5):
        scored.clear()
        # exactly the unchunked-by-position result: each position is computed on its own
        assert perplexity(model, ids, b, "cpu", labels) == whole[b]
        assert {dtype for _, dtype in scored} == {torch.float32}
        assert max(shape[0] for shape, _ in scored) == 5 and all(len(shape) == 2 for shape, _ in scored)
        assert sum(shape[0] for shape, _ in scored) == 5 * 23  # every position of every row, once
    monkeypatch.setattr(text, "LOSS_CHUNK_BYTES", 1)  # a vocabulary larger than the budget: one position
    assert text.loss_chunk_positions(300) == 1
    assert perplexity(model, ids, 2, "cpu", labels) == whole[2]


def test_plan_counts_the_chunk_perplexity_scores():
    assert memory.LOSS_CHUNK_BYTES == text.LOSS_CHUNK_BYTES  # repeated in the plan, which imports no torch
    shape = ModelShape(model_type="llama", hidden=6656, layers=60, vocab=32000, heads=52,
                       linear_layers=((("model.layers.0.mlp.down_proj", 17920, 6656),),), other_params=0)  # fmt: skip
    trial = TrialConfig(
        model={"path": "x", "dtype": "bfloat16"},
        quant={"method": "nf4", "bits": 4},
        data={"seq_len": 2048},
        train={"batch_size": 8, "precision": "bf16"},
    )
    n = text.loss_chunk_positions(32000)
    assert n == 262
    # bf16 logits of the batch, then 262 positions' fp32 copy and log-probabilities: 1.05 GB + 67 MB, where
    # casting the whole batch as before took 2·4·b·s·V = 4.2 GB more
    assert memory.eval_logits_bytes(trial, shape) == 2 * 8 * 2048 * 32000 + 8 * n * 32000
    fp32 = trial.model_copy(update={"model": trial.model.model_copy(update={"dtype": "float32"}),
                                    "train": trial.train.model_copy(update={"precision": "fp32"})})  # fmt: skip
    assert memory.eval_logits_bytes(fp32, shape) == 4 * 8 * 2048 * 32000 + 4 * n * 32000  # no fp32 copy


def test_default_lm_eval_limit_by_model_size_and_an_explicit_one_wins():
    unset = EvalSpec()
    assert unset.lm_eval_limit_for(LM_EVAL_LARGE_MODEL_PARAMETERS - 1) is None  # every document
    assert unset.lm_eval_limit_for(LM_EVAL_LARGE_MODEL_PARAMETERS) == LM_EVAL_LARGE_MODEL_LIMIT == 1000
    assert EvalSpec(lm_eval_limit=200).lm_eval_limit_for(30 * 10**9) == 200
    assert EvalSpec(lm_eval_limit=10**6).lm_eval_limit_for(30 * 10**9) == 10**6  # a whole task, on 30B
    assert EvalSpec(lm_eval_limit=5).lm_eval_limit_for(10**5) == 5
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        EvalSpec(lm_eval_limit=0)


def test_model_parameters_counts_the_checkpoint_not_what_memory_holds(model):
    from peft import LoraConfig, get_peft_model

    base = sum(p.numel() for p in model.parameters())
    assert model_parameters(model) == base
    wrapped = get_peft_model(
        AutoModelForCausalLM.from_config(make_micro_config("llama", vocab=300)),
        LoraConfig(r=4, target_modules="all-linear"),
    )
    assert model_parameters(wrapped) == base  # LoRA's parameters are not the model's
    # a 30B-shaped config, rebuilt on the meta device in well under a second
    config = LlamaConfig(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                         vocab_size=32000)  # fmt: skip
    meta = AutoModelForCausalLM.from_config(make_micro_config("llama"))
    meta.config = config
    assert model_parameters(meta) == 32_528_943_616 >= LM_EVAL_LARGE_MODEL_PARAMETERS
