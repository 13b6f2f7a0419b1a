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


# fp32 logits scored at once by `perplexity`: each position's fp32 logits and cross_entropy's fp32
# log-probabilities, 8·V bytes (orchestrator/memory.py's `eval logits` term counts the same chunk).
LOSS_CHUNK_BYTES = 64 * 2**20


def loss_chunk_positions(vocab_size: int) -> int:
    """Positions `perplexity` scores at once: as many as LOSS_CHUNK_BYTES hold at 8·V bytes each, at least one."""
    return max(1, LOSS_CHUNK_BYTES // (8 * vocab_size))


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

    Memory: a forward's logits stay as the forward returns them (``batch_size`` x seq_len x V in the model's
    dtype); they are cast to fp32 and scored loss_chunk_positions(V) positions of one row at a time, so what
    scoring adds (the fp32 copy and the log-probabilities) stays within LOSS_CHUNK_BYTES (or one position's)
    whatever the batch and sequence length.
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
        logits = model(input_ids=ids).logits
        nll = _next_token_nll(logits, targets)
        del logits
        totals[0] += (nll.sum(dim=1).double() * weight).sum()
        totals[1] += ((targets != IGNORE_INDEX).sum(dim=1).double() * weight).sum()
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return math.exp(totals[0].item() / totals[1].item())


def _next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows, seq_len - 1) fp32 NLL of ``targets`` (the labels shifted by one) under ``logits`` (rows, seq_len,
    V, any dtype), 0 where IGNORE_INDEX; a contiguous run of positions of one row at a time (a view of the
    logits, so the fp32 cast and the log-probabilities are of that run only). Each position's value does not
    depend on the runs: cross_entropy over a (positions, V) input computes every position on its own."""
    nll = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    positions = targets.shape[1]
    step = loss_chunk_positions(logits.shape[-1])
    for row in range(len(targets)):
        for begin in range(0, positions, step):
            end = min(begin + step, positions)
            nll[row, begin:end] = F.cross_entropy(
                logits[row, begin:end].float(),
                targets[row, begin:end],
                reduction="none",
                ignore_index=IGNORE_INDEX,
            )
    return nll
