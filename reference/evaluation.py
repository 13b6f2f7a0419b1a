"""The unigram baseline that a pretrained reference model must beat by far (perplexity: quailora.text)."""

from __future__ import annotations

import math

import torch


def unigram_perplexity(train_stream: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed training token frequencies on the same positions `perplexity` scores."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())
