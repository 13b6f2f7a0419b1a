"""Sweep config schema, expansion, drop_if rules, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.drop_rules import DropRule
from orchestrator.expand import expand
from orchestrator.sweep_config import SweepConfig, load_sweep
from quailora.errors import QuailoraInputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = {"model": {"path": "reference:llama-micro"}}


def _sweep(**fields) -> SweepConfig:
    return SweepConfig.model_validate({"name": "t", "base": BASE, "space": {"seed": {"grid": [0]}}, **fields})


def test_grid_is_cartesian_product_minus_dropped_combinations():
    sweep = _sweep(
        space={
            "quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]},
            "init.method": {"grid": ["gaussian", "quailora", "svd"]},
            "lora.rank": {"grid": [8, 16]},
            "seed": {"grid": [0, 1]},
        },
        drop_if=["quant.bits == 8 and init.method != 'gaussian'"],
    )
    matrix = expand(sweep)
    assert matrix.num_trials == (3 + 1) * 2 * 2  # 4-bit x 3 inits + 8-bit gaussian, x ranks x seeds
    assert len(matrix.dropped) == 2 * 2 * 2
    combos = {
        (p.config["quant"]["method"], p.config["quant"]["bits"], p.config["init"]["method"])
        for p in matrix.points
    }
    assert ("int8", 8, "gaussian") in combos and ("int8", 8, "quailora") not in combos
    names = [p.name for p in matrix.points]
    assert len(set(names)) == len(names) and "quant=int8-8_method=gaussian_rank=16_seed=1" in names


def test_sub_dict_grid_merges_over_base_and_keeps_other_fields():
    sweep = _sweep(
        base={**BASE, "quant": {"blocksize": 128}}, space={"quant": {"grid": [{"method": "fp4", "bits": 4}]}}
    )
    (point,) = expand(sweep).points
    assert point.config["quant"] == {
        "method": "fp4",
        "bits": 4,
        "blocksize": 128,
        "double_quant": True,
        "group_size": 64,
    }
    assert point.config["tags"]["sweep"] == "t"


def test_random_search_validates_sampled_bounds_and_counts_samples():
    sweep = _sweep(
        space={"lora.rank": {"grid": [4, 8]}, "train.learning_rate": {"loguniform": [1e-5, 1e-3]}},
        search={"algorithm": "random", "num_samples": 3},
    )
    matrix = expand(sweep)
    assert matrix.num_trials == 6 and list(matrix.sampled) == ["train.learning_rate"]
    assert matrix.points[0].trial_config({"train.learning_rate": 3e-4}).train.learning_rate == 3e-4
    bad = _sweep(space={"lora.dropout": {"uniform": [0.0, 1.5]}}, search={"algorithm": "random"})
    with pytest.raises(QuailoraInputError, match=r"space.lora.dropout=1.5.*lora.dropout"):
        expand(bad)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"space": {"lora.rnk": {"grid": [8]}}}, r"space.lora.rnk.*'rnk' is not one of"),
        (
            {"space": {"lora.rank": {"grid": [0]}}},
            r"lora.rank: Input should be greater than or equal to 1 \(got 0\)",
        ),
        ({"space": {"quant": {"grid": [{"method": "nf4", "bits": 8}]}}}, r"quant.bits=8 is not possible"),
        ({"drop_if": ["quant.bits == 8 and __import__('os')"]}, r"drop_if\[0\].*not allowed"),
        ({"drop_if": ["lora.rank >"]}, r"drop_if\[0\]: cannot parse"),
        ({"drop_if": ["quant.bitz == 8"]}, r"field 'quant.bitz' does not exist"),
        (
            {"space": {"lora.rank": {"grid": [8]}}, "drop_if": ["lora.rank == 8"]},
            r"drop_if removed all 1 combinations",
        ),
    ],
)
def test_bad_trial_fields_name_the_field(fields, match):
    with pytest.raises(QuailoraInputError, match=match):
        expand(_sweep(**fields))


def test_drop_if_cannot_use_sampled_fields():
    sweep = _sweep(space={"train.learning_rate": {"uniform": [1e-4, 1e-3]}}, drop_if=["train.learning_rate > 5e-4"],
                   search={"algorithm": "random"})  # fmt: skip
    with pytest.raises(QuailoraInputError, match="sampled by the search"):
        expand(sweep)


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ({"name": "t", "base": BASE, "bogus": 1}, "bogus"),
        ({"name": "t", "base": BASE, "search": {"num_samples": "many"}}, "search.num_samples"),
        ({"name": "t", "base": BASE, "space": {"lora.rank": {"grid": []}}}, "space.lora.rank.grid.grid"),
        ({"name": "t", "base": BASE, "space": {"lora.rank": {"gird": [1]}}}, "space.lora.rank"),
        (
            {
                "name": "t",
                "base": BASE,
                "space": {"train.learning_rate": {"loguniform": [0, 1]}},
                "search": {"algorithm": "random"},
            },
            "loguniform",
        ),
        (
            {"name": "t", "base": BASE, "space": {"lora.rank": {"choice": [4, 8]}}},
            "",
        ),  # grid search cannot sample
        ({"name": "a b", "base": BASE}, "name"),
    ],
)
def test_schema_rejects_bad_sweeps(raw, loc):
    with pytest.raises(ValidationError) as info:
        SweepConfig.model_validate(raw)
    assert loc in ".".join(str(p) for p in info.value.errors()[0]["loc"]) or loc == ""


def test_drop_rule_evaluator():
    rule = DropRule(
        "init.method in ['qalora_zero', 'qalora_closed_form'] and not quant.method == 'int' or lora.rank * 2 > 100"
    )
    assert rule.fields == ["init.method", "lora.rank", "quant.method"]
    trial = {"init": {"method": "qalora_zero"}, "quant": {"method": "nf4"}, "lora": {"rank": 8}}
    assert rule.matches(trial)
    assert not rule.matches({**trial, "quant": {"method": "int"}})
    assert rule.matches({**trial, "quant": {"method": "int"}, "lora": {"rank": 64}})


def test_json_schema_export_has_domains():
    schema = SweepConfig.model_json_schema()
    assert set(schema["required"]) == {"name", "base"}
    assert {"GridDomain", "LogUniformDomain", "SearchSpec"} <= set(schema["$defs"])


@pytest.mark.parametrize(
    "name", ["quickstart", "paper_replication", "rank_bits_sweep", "cross_family_benchmark"]
)
def test_shipped_configs_expand(name):
    matrix = expand(load_sweep(CONFIGS / f"{name}.yaml"))
    assert matrix.num_trials >= 6


def test_quickstart_is_the_six_trial_comparison():
    matrix = expand(load_sweep(CONFIGS / "quickstart.yaml"))
    combos = sorted(
        (p.config["quant"]["bits"], p.config["init"]["method"], p.config["lora"]["rank"])
        for p in matrix.points
    )
    assert combos == [
        (4, "gaussian", 4),
        (4, "gaussian", 8),
        (4, "quailora", 4),
        (4, "quailora", 8),
        (8, "gaussian", 4),
        (8, "gaussian", 8),
    ]


def test_paper_config_covers_the_paper_grid():
    matrix = expand(load_sweep(CONFIGS / "paper_replication.yaml"))
    models = {p.config["model"]["path"].rsplit("/", 1)[-1] for p in matrix.points}
    assert {"llama-7b", "llama-13b", "llama-30b"} <= models
    assert any(m.startswith("opt") for m in models) and any(m.startswith("bloom") for m in models)
    assert any(m.startswith("pythia") for m in models)
    assert {p.config["lora"]["rank"] for p in matrix.points} == {8, 16, 32, 64}
    assert {p.config["quant"]["bits"] for p in matrix.points} == {4, 8}
