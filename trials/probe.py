"""The probe a trial logs: enough of its final model's output to check any reload of it with stock tools.

Not the full logits (2 blocks x seq x vocab in fp32: 0.5 GB at LLaMA-30B's vocabulary and 2048 tokens,
2.5 GB at a 152k vocabulary) but, at every position, the TOP_K largest logits with their token ids, in fp32
(reloads are compared at 1e-4, which bf16 could not carry), and the log-sum-exp over the whole vocabulary,
so the top tokens' log-probabilities can be checked as well: 2 x seq x (TOP_K x 8 + 4) bytes.
"""

from __future__ import annotations

import torch

from trials.contract import PROBE_TOP_K as TOP_K


def make_probe(input_ids: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the probe file holds, on the CPU: input_ids, top_logits, top_indices (int32) and logsumexp."""
    logits = logits.float()
    values, indices = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1)
    return {"input_ids": input_ids.cpu(), "top_logits": values.cpu(), "top_indices": indices.to(torch.int32).cpu(),
            "logsumexp": logits.logsumexp(-1).cpu()}  # fmt: skip


def at_probe(logits: torch.Tensor, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """Another model's logits on the probe's input ids, at the probe's top tokens (compare to top_logits)."""
    return logits.float().gather(-1, probe["top_indices"].long().to(logits.device))
