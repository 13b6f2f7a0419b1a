"""benchmarks/init_diagnosis.py on the micro model: its rows obey what holds by construction."""

from __future__ import annotations

import math

import pytest

from benchmarks.init_diagnosis import VARIANTS, diagnose


def test_diagnosis_rows_agree_with_the_math():
    rows = list(diagnose("reference:llama-micro", 4, seq_len=32, eval_blocks=32))  # micro: 64 positions
    by = {r["init"]: r for r in rows}
    hybrids = [r for r in rows if r["init"].startswith("svd; quailora on ")]
    assert len(rows) == len(VARIANTS) + len(hybrids) and len(hybrids) == 7  # q k v o gate up down
    errors = {label: r["errors"] for label, r in by.items()}
    # Eckart-Young: no rank-r product has less weight error than the truncated SVD.
    assert all(e["weight"] >= errors["svd"]["weight"] - 1e-6 for e in errors.values())
    # ALS from the SVD start lowers the calibrated objective on its own Gram.
    assert errors["quailora"]["calibration"] < errors["svd"]["calibration"]
    # Errors are means over layers, so the per-projection swaps add up to the whole swap.
    for kind in ("weight", "validation", "calibration"):
        swapped = sum(r["errors"][kind] - errors["svd"][kind] for r in hybrids)
        assert swapped == pytest.approx(errors["quailora"][kind] - errors["svd"][kind], abs=1e-6)
    for r in rows:
        gap = r["val_ppl_nf4"] - r["val_ppl_8bit"]
        assert r["recovers"] == pytest.approx((r["val_ppl_nf4"] - r["val_ppl"]) / gap)
        for name, scores in r["sets"].items():
            nf4 = r["references"][name]["NF4"]
            assert r["references"][name]["full precision"]["kl"] == pytest.approx(0, abs=1e-6)
            assert scores["kl"] >= 0 and scores["recovers"]["kl"][0] == pytest.approx(
                1 - scores["kl"] / nf4["kl"]
            )
            point, low, high = scores["recovers"]["kl"]  # NF4's KL is far from 0: a well-defined ratio
            assert low <= point <= high
            low, high = scores["recovers"]["ppl"][1:]  # the 8-bit gap may be near 0 on 32 blocks: NaN
            assert math.isnan(low) or low <= high
    assert len({round(r["val_ppl"], 6) for r in rows}) > len(rows) // 2  # each row evaluated its own adapters
