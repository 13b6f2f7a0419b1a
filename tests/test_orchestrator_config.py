"""Sweep config schema, expansion, drop_if rules, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.drop_rules import DropRule
from orchestrator.expand import expand, sampled_trial_name
from orchestrator.plan import plan_trials
from orchestrator.sweep_config import SweepConfig, load_sweep
from quailora.errors import QuailoraInputError
from trials.commands import load_trial_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = {"model": {"path": "reference:llama-micro"}}
GRID = {"lora.rank": {"grid": [4]}}
# Every YAML in configs/: the init methods each sweep compares, and the single-trial configs.
SHIPPED_SWEEPS = {
    "quickstart": {"gaussian", "quailora"},
    "paper_replication": {"gaussian", "quailora", "loftq"},
    "rank_bits_sweep": {
        "gaussian",
        "svd",
        "quailora",
        "closed_form",
        "loftq",
        "qalora_zero",
        "qalora_closed_form",
    },
    "cross_family_benchmark": {"gaussian", "quailora", "closed_form"},
    "reference_replication": {"gaussian", "svd", "quailora", "closed_form", "loftq"},
    "reference_controls": {"gaussian", "svd", "quailora", "closed_form", "loftq", "qalora_closed_form"},
    "qalora_reference": {"gaussian", "quailora", "qalora_zero", "qalora_closed_form"},
    "fair_comparison": {"gaussian", "svd", "quailora", "closed_form", "loftq"},
    "low_bit_sweep": {"gaussian", "svd", "quailora", "closed_form"},
    "init_dynamics": {"gaussian", "svd", "quailora"},  # and svd with init.zero_start
}
SHIPPED_TRIALS = {"trial_micro", "fair_comparison_timing"}
SHIPPED_EXAMPLES = {"asha_micro"}  # sweeps that show a feature rather than compare methods


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


def test_sampled_trials_are_named_by_their_sampled_values():
    # Optuna over a rate and a rank choice: without a varying grid the name is the values alone
    values = {"train.learning_rate": 0.00031622776, "lora.rank": 8}
    assert sampled_trial_name("t", "t", values) == "learning_rate=0.000316_rank=8"
    assert sampled_trial_name("method=svd", "t", values) == "method=svd_learning_rate=0.000316_rank=8"
    assert sampled_trial_name("method=svd", "t", {}) == "method=svd"  # a grid-only trial keeps its name
    assert sampled_trial_name("t", "t", {}) == "t"
    quant = {"quant": {"method": "int", "bits": 3}}
    assert sampled_trial_name("t", "t", quant) == "quant=int-3"  # a sampled sub-config, as the grid shows one


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


def test_drop_if_drops_combinations_that_are_not_valid_trials():
    # nf4 at 8 bits and int8 at 4 bits fail TrialConfig; drop_if must drop them, not abort the sweep.
    sweep = _sweep(
        space={"quant.method": {"grid": ["nf4", "int8"]}, "quant.bits": {"grid": [4, 8]}},
        drop_if=["quant.method == 'nf4' and quant.bits == 8", "quant.method == 'int8' and quant.bits == 4"],
    )
    matrix = expand(sweep)
    assert [(p.config["quant"]["method"], p.config["quant"]["bits"]) for p in matrix.points] == [
        ("nf4", 4),
        ("int8", 8),
    ]
    assert matrix.dropped == [
        {"quant.method": "nf4", "quant.bits": 8},
        {"quant.method": "int8", "quant.bits": 4},
    ]
    # Rules see defaults of fields the sweep never sets (quant.blocksize), and a kept invalid combination still fails.
    with pytest.raises(QuailoraInputError, match=r"quant.bits=8 is not possible"):
        expand(sweep.model_copy(update={"drop_if": ["quant.blocksize != 64"]}))


def test_sampled_fields_are_validated_together_at_their_corners():
    # Over an int/4 base each sampled value is valid alone; Tune may still draw nf4 with 2 bits.
    sweep = _sweep(
        base={**BASE, "quant": {"method": "int", "bits": 4}},
        space={"quant.method": {"choice": ["int", "nf4"]}, "quant.bits": {"choice": [4, 2]}},
        search={"algorithm": "random"},
    )
    with pytest.raises(
        QuailoraInputError, match=r"space.quant.method='nf4', space.quant.bits=2: .*not possible"
    ):
        expand(sweep)


def test_init_options_in_a_grid_flatten_into_the_name():
    sweep = _sweep(
        space={
            "init": {
                "grid": [
                    {"method": "quailora"},
                    {"method": "quailora", "options": {"split": "kaiming_a"}},
                    {"method": "svd", "zero_start": True},  # a boolean true against a false default: its name
                ]
            }
        }
    )
    names = [p.name for p in expand(sweep).points]
    assert names == ["init=quailora", "init=quailora-kaiming_a", "init=svd-zero_start"]


def test_duplicate_trial_names_are_refused_naming_them():
    # Booleans are left out of names (but for one true against a false default), so these two quant configs
    # would both be 'quant=nf4-4'.
    sweep = _sweep(
        space={
            "quant": {
                "grid": [
                    {"method": "nf4", "bits": 4, "double_quant": True},
                    {"method": "nf4", "bits": 4, "double_quant": False},
                ]
            }
        }
    )
    with pytest.raises(
        QuailoraInputError, match=r"1 trial name\(s\) come from more than one grid combination: 'quant=nf4-4'"
    ):
        expand(sweep)


def test_drop_if_cannot_use_sampled_fields():
    sweep = _sweep(space={"train.learning_rate": {"uniform": [1e-4, 1e-3]}}, drop_if=["train.learning_rate > 5e-4"],
                   search={"algorithm": "random"})  # fmt: skip
    with pytest.raises(QuailoraInputError, match="sampled by the search"):
        expand(sweep)


@pytest.mark.parametrize(
    ("raw", "loc", "msg"),
    [
        ({"name": "t", "base": BASE, "bogus": 1}, "bogus", "Extra inputs"),
        (
            {"name": "t", "base": BASE, "search": {"num_samples": "many"}},
            "search.num_samples",
            "valid integer",
        ),
        (
            {"name": "t", "base": BASE, "space": {"lora.rank": {"grid": []}}},
            "space.lora.rank.grid.grid",
            "at least 1",
        ),
        (
            {"name": "t", "base": BASE, "space": {"lora.rank": {"gird": [1]}}},
            "space.lora.rank",
            "exactly one key",
        ),
        (
            {
                "name": "t",
                "base": BASE,
                "space": {"train.learning_rate": {"loguniform": [0, 1]}},
                "search": {"algorithm": "random"},
            },
            "space.train.learning_rate.loguniform.loguniform",
            "must be > 0",
        ),
        # A model-level check has no loc; its message names the field.
        (
            {"name": "t", "base": BASE, "space": {"lora.rank": {"choice": [4, 8]}}},
            "",
            "space.lora.rank: search.algorithm='grid' allows only 'grid' domains",
        ),
        ({"name": "a b", "base": BASE}, "name", "should match pattern"),
        (
            {"name": "t", "base": BASE, "space": GRID, "driver_cpus": -1},
            "driver_cpus",
            "greater than or equal to 0",
        ),
        (
            {"name": "t", "base": BASE, "space": GRID, "driver_cpus": 0},
            "",
            "driver_cpus: 0 needs a driver_resources entry",
        ),
        (
            {"name": "t", "base": BASE, "space": GRID, "storage_path": "s3://bucket/runs"},
            "",
            "cache_path: storage_path 's3://bucket/runs' is a URI",
        ),
    ],
)
def test_schema_rejects_bad_sweeps(raw, loc, msg):
    with pytest.raises(ValidationError) as info:
        SweepConfig.model_validate(raw)
    first = info.value.errors()[0]
    assert ".".join(str(p) for p in first["loc"]) == loc
    assert msg in first["msg"]


def test_cluster_fields_that_hold():
    """Drivers on a CPU-less head ask for its resource only; a URI storage with a named cache is fine."""
    from orchestrator.tuning import _driver_bundle

    sweep = SweepConfig.model_validate(
        {"name": "t", "base": BASE, "space": GRID, "driver_cpus": 0, "driver_resources": {"head": 0.01},
         "storage_path": "s3://bucket/runs", "cache_path": "/mnt/shared/cache"}
    )  # fmt: skip
    assert _driver_bundle(sweep) == {"head": 0.01}
    assert sweep.resolved_cache_path() == "/mnt/shared/cache"
    assert SweepConfig.model_validate({"name": "t", "base": BASE, "space": GRID, "storage_path": "s3://b/r",
                                       "share_stages": False}).resolved_cache_path() is None  # fmt: skip


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


def test_every_shipped_config_is_tested():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(SHIPPED_SWEEPS) | SHIPPED_TRIALS | SHIPPED_EXAMPLES


@pytest.mark.parametrize("name", sorted(SHIPPED_SWEEPS))
def test_shipped_sweeps_fit_and_compare_each_method_with_both_baselines(name):
    matrix = expand(load_sweep(CONFIGS / f"{name}.yaml"))
    planned = plan_trials(matrix)
    assert [p.name for p in planned if not p.fits] == []
    methods = {(p.config["quant"]["bits"], p.config["init"]["method"]) for p in matrix.points}
    assert {m for _, m in methods} == SHIPPED_SWEEPS[name]
    # The recovered fraction needs the 4-bit and 8-bit gaussian runs; 8 bits is only the baseline.
    assert (4, "gaussian") in methods and {m for bits, m in methods if bits == 8} == {"gaussian"}


@pytest.mark.parametrize("name", sorted(SHIPPED_EXAMPLES))
def test_shipped_example_sweeps_fit(name):
    planned = plan_trials(expand(load_sweep(CONFIGS / f"{name}.yaml")))
    assert planned and all(p.fits for p in planned)


@pytest.mark.parametrize("name", sorted(SHIPPED_TRIALS))
def test_shipped_trial_configs_load(name):
    assert load_trial_config(CONFIGS / f"{name}.yaml").name


def test_the_timing_trial_is_a_trial_of_the_fair_comparison_with_fewer_steps():
    """What it times must stay what the sweep runs: only the name, tags and the step budget differ."""
    timing = load_trial_config(CONFIGS / "fair_comparison_timing.yaml")
    sweep = load_sweep(CONFIGS / "fair_comparison.yaml")
    assert timing.train.max_steps < sweep.base["train"]["max_steps"]

    def comparable(trial) -> dict:
        fields = trial.model_dump()
        fields["name"] = fields["tags"] = fields["train"]["max_steps"] = None  # labels and the budget
        return fields

    wanted = comparable(timing)
    trials = [p.trial_config({}) for p in expand(sweep).points]
    assert wanted in [comparable(t) for t in trials]


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
