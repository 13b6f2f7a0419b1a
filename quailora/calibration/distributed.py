"""Data-parallel calibration: each process runs its share of the calibration sequences through every
decoder layer, and per layer the Gram sums and token counts are summed over the processes; one writes.

Chosen over pipelining layers across processes (docs/architecture.md): every process streams the same
layer at the same time, so each holds one decoder layer and its own share of the hidden states, the work
is balanced to within one sequence, and the only collective per layer is a short sum of a few in x in
matrices, so no process waits in a collective while another computes for long.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from quailora.calibration.accumulate import GramAccumulator
from quailora.calibration.partition import partition_layers


class GramReducer(Protocol):
    """Combines the per-process partial sums of one layer; ``writes`` is True on the process that stores them."""

    writes: bool

    def reduce(self, grams: GramAccumulator) -> None: ...
    def total(self, count: int) -> int: ...


def sequence_share(input_ids: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous share of the calibration sequences (the first processes get the extra ones)."""
    rows = partition_layers(list(range(input_ids.shape[0])), world_size)[rank]
    return input_ids[rows[0] : rows[-1] + 1] if rows else input_ids[:0]


class ProcessGroupSum:
    """GramReducer over a torch.distributed process group (gloo or NCCL); rank 0 writes.

    Processes may have seen different inputs (no sequences at all, or, in a mixture of experts, no token
    routed to some expert), so the set of Grams is agreed first and a missing partial sum counts as zero.
    """

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.device = device  # where collectives run: CUDA for NCCL, CPU for gloo
        self.group = group
        self.writes = dist.get_rank(group) == 0

    def total(self, count: int) -> int:
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def reduce(self, grams: GramAccumulator) -> None:
        mine = {key: (t.shape[0], t.dtype) for key, t in grams.sums.items()}
        everyone: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, (mine, dict(grams.group_of)), group=self.group)
        shapes, groups = {}, {}
        for their_shapes, their_groups in everyone:
            shapes.update(their_shapes)
            groups.update(their_groups)
        for key in sorted(shapes):  # the same order on every process
            width, dtype = shapes[key]
            total = grams.sums.get(key)
            if total is None:
                total = torch.zeros(width, width, dtype=dtype)
            total = total.to(self.device)
            dist.all_reduce(total, group=self.group)
            grams.sums[key] = total
        counts = torch.tensor(
            [grams.rows.get(k, 0) for k in sorted(shapes)], dtype=torch.int64, device=self.device
        )
        dist.all_reduce(counts, group=self.group)
        grams.rows = dict(zip(sorted(shapes), counts.tolist(), strict=True))
        grams.group_of = groups
