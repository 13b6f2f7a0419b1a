"""Perplexity on held-out text, and the unigram baseline that a pretrained model must beat by far."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined, each followed by the end-of-text token."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def blocks(stream: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) blocks from the start of `stream`, at most `max_tokens` tokens."""
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: PreTrainedModel, eval_blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted position of `eval_blocks`."""
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in eval_blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def unigram_perplexity(train_stream: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed training token frequencies on the same positions `perplexity` scores."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())
