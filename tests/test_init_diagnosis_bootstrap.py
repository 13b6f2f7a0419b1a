"""benchmarks/init_diagnosis.py's paired bootstrap and block scores, in process on synthetic data (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.init_diagnosis import (
    block_scores,
    kl_recovered,
    log_probs,
    minus_svd,
    paired_bootstrap,
    ppl_recovered,
)


def synthetic_kl(n: int, seed: int, ratio: float = 0.4) -> torch.Tensor:
    """Per block: the row's KL sum and NF4's, the row keeping ``ratio`` of NF4's KL on average (noisy)."""
    g = torch.Generator().manual_seed(seed)
    nf4 = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    row = ratio * nf4 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([row, nf4], dim=1)


def test_interval_covers_the_true_ratio():
    point, low, high = paired_bootstrap(synthetic_kl(400, seed=1), kl_recovered)
    assert low < 0.6 < high and low <= point <= high and high - low < 0.05


def test_coverage_is_near_the_nominal_level():
    # 60 data sets from one population (true fraction recovered 0.6): about 95 % of the intervals hold it.
    covered = 0
    for seed in range(60):
        _, low, high = paired_bootstrap(synthetic_kl(100, seed), kl_recovered, resamples=1000, seed=seed)
        covered += low <= 0.6 <= high
    assert covered >= 52


def test_pairing_and_degenerate_cases():
    # Each block keeps exactly 40 % of NF4's KL: paired resamples never move the ratio, an unpaired one would.
    nf4 = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    assert paired_bootstrap(torch.stack([0.4 * nf4, nf4], 1), kl_recovered) == pytest.approx((0.6, 0.6, 0.6))
    # One block: every resample is that block.
    assert paired_bootstrap(torch.tensor([[0.3, 1.0]]), kl_recovered) == pytest.approx((0.7, 0.7, 0.7))
    # No gap to recover (NF4 = 8-bit): no interval.
    point, low, high = paired_bootstrap(torch.tensor([[1.0, 2.0, 2.0, 10.0]] * 5), ppl_recovered)
    assert not math.isfinite(point) and math.isnan(low) and math.isnan(high)
    # Seeded: the same draw twice, another seed another draw.
    blocks = synthetic_kl(30, seed=3)
    assert paired_bootstrap(blocks, kl_recovered, seed=4) == paired_bootstrap(blocks, kl_recovered, seed=4)
    assert paired_bootstrap(blocks, kl_recovered, seed=4) != paired_bootstrap(blocks, kl_recovered, seed=5)


def test_ppl_recovered_is_the_gap_fraction():
    nll = torch.tensor([[3.0, 4.0, 2.0, 2.0]])  # row, NF4, 8-bit NLL sums over 2 tokens
    ppl = [math.exp(v / 2) for v in (3.0, 4.0, 2.0)]
    assert float(ppl_recovered(nll.sum(0))) == pytest.approx((ppl[1] - ppl[0]) / (ppl[1] - ppl[2]))


class Logits(torch.nn.Module):
    """A 'model' whose logits are a fixed table indexed by token id."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_block_scores_nll_and_kl():
    g = torch.Generator().manual_seed(0)
    p, q = Logits(torch.randn(7, 5, generator=g)), Logits(torch.randn(7, 5, generator=g))
    ids = torch.randint(5, (3, 6), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100  # left out of the loss: target of position 2
    scores = block_scores(q, log_probs(p, ids, batch_size=2), ids, labels, batch_size=2)
    log_p, log_q = p.table[ids].log_softmax(-1), q.table[ids].log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1]
    nll = -log_q[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    assert scores[:, 2].tolist() == [4, 5, 5]
    assert torch.allclose(scores[:, 0], (nll * keep).sum(1).double(), atol=1e-5)
    assert torch.allclose(scores[:, 1], (kl * keep).sum(1).double(), atol=1e-5)
    assert (scores[:, 1] > 0).all()
    assert torch.allclose(
        block_scores(p, log_probs(p, ids), ids, labels)[:, 1], torch.zeros(3, dtype=torch.float64), atol=1e-6
    )


def test_minus_svd_is_paired():
    g = torch.Generator().manual_seed(2)
    tokens = torch.full((40,), 100.0, dtype=torch.float64)
    nf4 = torch.stack([400 + torch.rand(40, generator=g, dtype=torch.float64), 0.02 * tokens, tokens], 1)
    eight = torch.stack([nf4[:, 0] - 2, 0.001 * tokens, tokens], 1)
    svd = torch.stack([nf4[:, 0] - 1, 0.01 * tokens, tokens], 1)
    assert minus_svd(svd, svd, nf4, eight) == {"ppl": [0.0, 0.0, 0.0], "kl": [0.0, 0.0, 0.0]}
    better = svd.clone()
    better[:, 0] -= 0.5  # half the remaining NLL gap on every block, KL halved
    better[:, 1] /= 2
    diff = minus_svd(better, svd, nf4, eight)
    assert diff["kl"] == pytest.approx([0.25, 0.25, 0.25])
    assert 0 < diff["ppl"][1] <= diff["ppl"][0] <= diff["ppl"][2]
