"""The benchmark's rows: the peer comes first, and our `svd` matches peft's SVD step on the same matrix."""

import pytest

from quailora.bench import DEFAULT_METHODS, RATIO_DECIMALS, SECONDS_DECIMALS, bench_rows
from quailora.errors import QuailoraInputError
from quailora.initializers import adapter_kind


def test_bench_rows_carry_peer_ratio_and_agree_with_peft():
    methods = ["gaussian", "svd", "closed_form", "qalora_closed_form"]
    rows = list(bench_rows([(96, 64)], [4], [4], methods, solver="exact", group_size=8))
    assert [r["method"] for r in rows] == ["peft_svd", *methods]
    by = {r["method"]: r for r in rows}
    peer = by["peft_svd"]["seconds"]
    # The ratio comes from the raw timings, the columns are rounded: the raw ratio lies in the interval the
    # rounded seconds allow, and the published ratio within its own rounding of it, whatever the timings.
    half_second, half_ratio = 0.5 * 10**-SECONDS_DECIMALS, 0.5 * 10**-RATIO_DECIMALS + 1e-12
    for row in rows[1:]:
        low = (row["seconds"] - half_second) / (peer + half_second)
        high = (row["seconds"] + half_second) / (peer - half_second)
        assert low - half_ratio <= row["peft_svd_seconds_ratio"] <= high + half_ratio, (row, peer)
    assert abs(by["svd"]["rel_error"] - by["peft_svd"]["rel_error"]) < 1e-4
    assert by["gaussian"]["rel_error"] == 1.0  # B = 0: the adapter starts as a no-op
    assert by["closed_form"]["rel_calibrated_error"] < by["svd"]["rel_calibrated_error"] < 1.0
    # The pooled adapter reaches fewer updates than plain LoRA, but still lowers the calibrated error.
    assert by["closed_form"]["rel_calibrated_error"] < by["qalora_closed_form"]["rel_calibrated_error"] < 1.0
    assert all(r["peak_mb"] >= 0 and r["seconds"] > 0 for r in rows)


def test_default_methods_come_from_the_registry():
    assert {"gaussian", "svd", "quailora", "closed_form", "loftq"} <= set(DEFAULT_METHODS)
    assert all(adapter_kind(m) == "plain" for m in DEFAULT_METHODS)  # pooled ones only via --methods


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"methods": ["svdd"]}, "'svdd'"),
        ({"solver": "fast"}, "solver='fast'"),
        ({"bits_list": [5]}, "--bits 5"),
    ],
)
def test_bad_arguments_fail_before_any_row(kwargs, needle):
    args = {"shapes": [(96, 64)], "ranks": [4], "bits_list": [4], "methods": ["svd"]} | kwargs
    with pytest.raises(QuailoraInputError, match=needle.replace("[", r"\[")):
        next(bench_rows(**args))


def test_layer_shapes_come_from_the_architecture_of_any_model():
    """bench reads a decoder layer's projections through quailora.architectures, not a table of its own."""
    from quailora.bench import decoder_shapes, layer_shapes
    from testkit.micro import make_micro_config

    assert sorted(decoder_shapes(6656, 17920).values()) == sorted(
        [(6656, 6656)] * 4 + [(17920, 6656)] * 2 + [(6656, 17920)]
    )  # LLaMA-30B
    phi3 = layer_shapes(make_micro_config("phi3"))
    assert phi3["self_attn.qkv_proj"] == (64 + 2 * 32, 64) and phi3["mlp.gate_up_proj"] == (2 * 128, 64)
    mixtral = layer_shapes(make_micro_config("mixtral"))
    assert sum(".experts." in name for name in mixtral) == 4 * 3  # every expert's projections, split
