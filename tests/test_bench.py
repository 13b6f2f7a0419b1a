"""The benchmark's rows: the peer comes first, and our `svd` matches peft's SVD step on the same matrix."""

from quailora.bench import bench_rows


def test_bench_rows_carry_peer_ratio_and_agree_with_peft():
    rows = list(bench_rows([(96, 64)], [8], [4], ["gaussian", "svd", "closed_form"], solver="exact"))
    assert [r["method"] for r in rows] == ["peft_svd", "gaussian", "svd", "closed_form"]
    by = {r["method"]: r for r in rows}
    assert by["peft_svd"]["peft_svd_seconds_ratio"] == 1.0
    assert abs(by["svd"]["rel_error"] - by["peft_svd"]["rel_error"]) < 1e-4
    assert by["gaussian"]["rel_error"] == 1.0  # B = 0: the adapter starts as a no-op
    assert by["closed_form"]["rel_calibrated_error"] < by["svd"]["rel_calibrated_error"] < 1.0
    assert all(r["peak_mb"] >= 0 and r["seconds"] > 0 for r in rows)
