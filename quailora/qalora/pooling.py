"""The pooling operator P of QA-LoRA, defined exactly as peft's QALoraLinearVariant computes it.

peft pools each group of L consecutive inputs by their *mean* and then multiplies by the number of
groups n/L, so P (n/L x n) has P[g, j] = (n/L)/L for j in group g. We keep peft's convention so that
peft drives training and checkpoints; the factor only rescales lora_A, not the reachable updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


def pooling_factor(in_features: int, group_size: int) -> float:
    """The value of every non-zero entry of P."""
    return (in_features // group_size) / group_size


def pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x P^T over the last dimension (... x n -> ... x n/L), as peft's forward does."""
    n = x.shape[-1]
    return x.reshape(*x.shape[:-1], n // group_size, group_size).sum(-1) * pooling_factor(n, group_size)


def pool_gram(gram: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P H Pᵀ, H Pᵀ) without forming P: block sums of H, scaled."""
    h_pt = pool(gram, group_size)  # H Pᵀ (H is symmetric, so pooling its rows' last dim gives H Pᵀ)
    return pool(h_pt.T, group_size), h_pt


def expand(y: torch.Tensor, group_size: int) -> torch.Tensor:
    """Y P for Y (m x n/L): the full-width weight update, constant inside each group."""
    in_features = y.shape[-1] * group_size
    return y.repeat_interleave(group_size, dim=-1) * pooling_factor(in_features, group_size)
