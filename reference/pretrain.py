"""Pretrain one reference model from scratch with transformers' own model class, seeded, and save it as a
standard sharded-safetensors checkpoint that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
    set_seed,
)

from quailora.errors import QuailoraInputError
from quailora.text import blocks, perplexity, token_stream
from reference.evaluation import unigram_perplexity
from reference.families import FAMILIES
from reference.specs import ModelSpec

METRICS_FILE = "reference_metrics.json"


def cpu_threads() -> int:
    """`OMP_NUM_THREADS` when set (on a shared, busy CPU one thread is faster), else the usable cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_untrained(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = FAMILIES.get(spec.family, where=f"model {spec.name}")(spec, special)
    set_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def training_batches(stream: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(steps, batch, seq_len) blocks in a seeded shuffled order; epochs repeat only if the corpus is short."""
    all_blocks = blocks(stream, spec.seq_len)
    needed = spec.steps * spec.batch_size
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.cat(
        [
            torch.randperm(len(all_blocks), generator=generator)
            for _ in range(math.ceil(needed / len(all_blocks)))
        ]
    )
    return all_blocks[order[:needed]].view(spec.steps, spec.batch_size, spec.seq_len)


def pretrain(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    validation_texts: list[str],
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Train `spec` on `train_texts`, save it to `out_dir`, return losses and validation perplexities."""
    for field, texts in (("train_texts", train_texts), ("validation_texts", validation_texts)):
        if sum(map(len, texts)) < spec.seq_len:
            raise QuailoraInputError(f"{spec.name}: {field} holds {len(texts)} documents, too little text")
    if torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads())
    model = build_untrained(spec, tokenizer).to(device)
    train_stream = token_stream(tokenizer, train_texts)
    batches = training_batches(train_stream, spec)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.95)
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, spec.warmup_steps, spec.steps)
    losses = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(batches, desc=f"pretrain {spec.name}", disable=not progress, unit="step")
    for batch in bar:
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - start

    eval_blocks = blocks(
        token_stream(tokenizer, validation_texts), spec.seq_len, spec.eval_tokens // spec.seq_len
    )
    metrics = {
        "name": spec.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": spec.steps * spec.batch_size * spec.seq_len,
        "train_seconds": round(train_seconds, 1),
        "first_loss": losses[0],
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "validation_perplexity": perplexity(model, eval_blocks),
        "unigram_perplexity": unigram_perplexity(train_stream, eval_blocks, spec.vocab_size),
        "validation_tokens": eval_blocks.numel(),
    }
    save_checkpoint(model.cpu(), tokenizer, spec, out_dir)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def save_checkpoint(model, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, out_dir: Path) -> None:
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(out_dir, max_shard_size=math.ceil(total_bytes / spec.num_shards))
    saved = copy.deepcopy(tokenizer)
    saved.model_max_length = spec.seq_len  # lm-eval reads it for families without position limits (bloom)
    saved.save_pretrained(out_dir)
