"""The scale benchmarks' arithmetic and their real multi-process run (docs/results/scale.md)."""

from __future__ import annotations

import json

import pytest

from benchmarks import init_workers, scale_extrapolate


def _row(method: str, shape: tuple[int, int], seconds: float, peak_mb: float) -> dict:
    return {"method": method, "shape": list(shape), "rank": 64, "bits": 4, "seconds": seconds, "peak_mb": peak_mb,
            "threads": 2}  # fmt: skip


def test_a_decoder_layer_is_four_square_two_up_one_down_projection():
    rows = [_row("svd", (8, 8), 1.0, 10), _row("svd", (24, 8), 10.0, 30), _row("svd", (8, 24), 100.0, 20)]
    rows.append(_row("loftq", (8, 8), 1.0, 10))  # shapes missing: no layer figure rather than a wrong one
    table = scale_extrapolate.per_layer(rows, hidden=8, mlp=24)
    assert list(table) == [("svd", 64, 4)]
    assert table[("svd", 64, 4)]["seconds"] == pytest.approx(4 * 1.0 + 2 * 10.0 + 100.0)
    assert table[("svd", 64, 4)]["peak_mb"] == 30


def test_extrapolation_counts_the_largest_share(tmp_path, capsys):
    rows = [_row("svd", (8, 8), 1.0, 10), _row("svd", (24, 8), 10.0, 30), _row("svd", (8, 24), 100.0, 20)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    scale_extrapolate.main(
        [str(path), "--hidden", "8", "--mlp", "24", "--layers", "5", "--workers", "1", "2"]
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| svd"))
    # 124 s per layer: 5 layers on one worker, ceil(5 / 2) = 3 on the busiest of two.
    assert line.split("|")[-3:-1] == [f" {5 * 124 / 60:.1f} ", f" {3 * 124 / 60:.1f} "]


def test_workers_split_the_layers_and_gather_every_adapter(capsys):
    init_workers.main(["--hidden", "16", "--mlp", "32", "--layers", "3", "--rank", "2", "--method", "svd",
                       "--workers", "1", "2"])  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["workers"], r["layers_per_worker_max"]) for r in rows] == [(1, 3), (2, 2)]
    assert rows[0]["speedup_vs_1"] == 1.0 and rows[1]["speedup_vs_1"] > 0
    assert all(0 < r["solve_seconds_max"] <= r["wall_seconds"] for r in rows)


def test_workers_refuse_bad_arguments_before_spawning():
    with pytest.raises(SystemExit):
        init_workers.main(["--workers", "2"])  # no 1-worker peer to compare with
    with pytest.raises(Exception, match="solver|iterations|method"):
        init_workers.main(["--method", "no_such_method", "--workers", "1"])
