"""Causal-LM text: documents into fixed-length token blocks, and perplexity on blocks.

Shared by the reference models' pretraining, the trials' data and evaluation, and the benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quailora.errors import QuailoraInputError

IGNORE_INDEX = -100  # label of a position left out of the loss (transformers' and PyTorch's convention)


def token_stream(tokenizer, texts, max_tokens: int | None = None) -> torch.Tensor:
    """The documents tokenized and joined, each followed by the end-of-text token (if the tokenizer has
    one); stops reading documents once ``max_tokens`` are collected."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def blocks(stream: torch.Tensor, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) blocks from the start of ``stream`` (1-D), at most ``max_blocks``."""
    n = stream.numel() // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise QuailoraInputError(
            f"dataset has {stream.numel()} tokens, fewer than one block of seq_len={seq_len}"
        )
    return stream[: n * seq_len].reshape(n, seq_len)


def tokenize_blocks(tokenizer, texts, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """``blocks(token_stream(...))``, reading only as many documents as ``max_blocks`` needs."""
    max_tokens = None if max_blocks is None else max_blocks * seq_len
    return blocks(token_stream(tokenizer, texts, max_tokens), seq_len, max_blocks)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    labels: torch.Tensor | None = None,
) -> float:
    """exp(mean next-token NLL) over every position of ``labels`` (default ``input_ids``) that is not
    IGNORE_INDEX.

    Under torch.distributed each process scores a strided share of the rows and the sums are all-reduced.
    Every process runs the same number of forwards (short shares are padded with weight-0 rows) because
    ZeRO-3 gathers parameters collectively inside each forward.
    """
    labels = input_ids if labels is None else labels
    device = device or next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    per_worker = math.ceil(len(input_ids) / world_size)
    mine = list(range(rank, len(input_ids), world_size))
    weights = [1.0] * len(mine) + [0.0] * (per_worker - len(mine))
    mine += [0] * (per_worker - len(mine))
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, scored tokens
    for start in range(0, per_worker, batch_size):
        rows = mine[start : start + batch_size]
        ids = input_ids[rows].to(device)
        targets = labels[rows].to(device)[:, 1:]
        weight = torch.tensor(weights[start : start + batch_size], device=device, dtype=torch.float64)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
        totals[0] += (nll.sum(dim=1).double() * weight).sum()
        totals[1] += ((targets != IGNORE_INDEX).sum(dim=1).double() * weight).sum()
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return math.exp(totals[0].item() / totals[1].item())
