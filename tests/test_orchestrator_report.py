"""Report tables, the recovered fraction, plots and the HTML page, from a table of trial records."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from orchestrator import comparison
from orchestrator.comparison import match_keys, recovered_fraction
from orchestrator.paired import holm
from orchestrator.report import (
    SECTIONS,
    Section,
    SweepRuns,
    build_report,
    learning_curves,
    learning_curves_figure,
    method_label,
    normalize,
    ppl_vs_rank_figure,
    recovered_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(method, bits, rank, seed, ppl, acc, quantizer=None, **extra):
    quantizer = quantizer or ("nf4" if bits == 4 else "int8")
    return {"family": "llama", "size": "1.2M", "bits": str(bits), "method": method, "rank": str(rank),
            "seed": str(seed), "quantizer": quantizer, "val_ppl_init": ppl + 5, "val_ppl_final": ppl,
            "lmeval_cloze_acc": acc, "model_size_mb": 1.0 if bits == 4 else 2.0, **extra}  # fmt: skip


@pytest.fixture
def records() -> pd.DataFrame:
    rows = []
    for rank in (4, 8):
        for seed, shift in ((0, 0.0), (1, 1.0)):
            p4, p8 = 20.0 + shift, 10.0 + shift
            rows += [
                _rec("gaussian", 4, rank, seed, p4, 0.40),
                _rec("gaussian", 8, rank, seed, p8, 0.60),
                # QuAILoRA recovers 75% (seed 0) and 85% (seed 1) of the perplexity gap, 50% of the accuracy gap.
                _rec("quailora", 4, rank, seed, p4 - (7.5 if seed == 0 else 8.5), 0.50),
                # QA-LoRA on group-wise INT4, compared with the INT4 gaussian run: (30 - 25) / (30 - p8).
                _rec("gaussian", 4, rank, seed, 30.0 + shift, 0.30, quantizer="int"),
                _rec("qalora_closed_form", 4, rank, seed, 25.0 + shift, 0.35, quantizer="int"),
            ]
    return pd.DataFrame(rows)


def test_recovered_fraction_matches_paper_formula(records):
    per_seed = recovered_fraction(normalize(records), "val_ppl_final")
    quail = per_seed[per_seed.method == "quailora"].sort_values(["rank", "seed"])
    assert quail.recovered.tolist() == pytest.approx([0.75, 0.85, 0.75, 0.85])
    qalora = per_seed[per_seed.method == "qalora_closed_form"]
    assert qalora.recovered.tolist() == pytest.approx([5 / 20] * 4)  # its own INT4 baseline, not NF4's


def test_report_tables_plots_and_html(records, tmp_path):
    report = build_report(records)
    assert list(report.tables) == ["llama 1.2M, 4-bit", "llama 1.2M, 8-bit"]
    four = report.tables["llama 1.2M, 4-bit"]
    row = four[(four.method == "quailora") & (four["rank"] == 8)].iloc[0]
    assert row["val ppl after fine-tuning"] == pytest.approx(((20 - 7.5) + (21 - 8.5)) / 2)
    assert row["val ppl after init"] == pytest.approx(row["val ppl after fine-tuning"] + 5)
    assert row["seeds"] == 2 and row["model MB"] == 1.0
    assert set(four.method) == {"gaussian", "quailora", "qalora_closed_form"}

    rec = report.recovered.set_index(["metric", "method", "rank"])
    quail = rec.loc[("perplexity", "quailora", 4)]
    # mean(p4 - arm) / mean(p4 - p8) = 8 / 10; the gap is 10 in both seeds, so Fieller's interval is the paired
    # t interval of the numerator over 10: (8 ± t(0.975, 1) · 0.7071 / √2) / 10, t(0.975, 1) = 12.7062
    assert quail.recovered == pytest.approx(0.80)
    assert (quail.recovered_lo, quail.recovered_hi) == pytest.approx((0.8 - 0.63531, 0.8 + 0.63531), abs=1e-4)
    assert quail.vs4 == pytest.approx(-8.0) and quail.vs8 == pytest.approx(2.0)
    assert quail.straddles_0 == "vs 8-bit"  # better than 4-bit QLoRA, not distinguishable from 8-bit
    assert rec.loc[("accuracy", "quailora", 8), "recovered"] == pytest.approx(0.5)
    assert report.recovered.split.loc[report.recovered.metric == "perplexity"].unique().tolist() == [
        "validation"  # the records have no test_ppl_final
    ]

    assert set(report.figures) == {"ppl_vs_rank.png", "recovered_per_family.png"}
    assert all(png.startswith(PNG_MAGIC) for png in report.figures.values())
    written = report.write(tmp_path, "sweep t")
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http" not in page  # self-contained
    assert "0.800 [0.165, 1.435]" in report.markdown() and "paired-t interval" in report.markdown()
    assert "0.800 [0.165, 1.435]" in page
    assert {p.name for p in written} == {
        "ppl_vs_rank.png",
        "recovered_per_family.png",
        "report.md",
        "report.html",
    }


def test_ppl_vs_rank_draws_8_bit_on_the_4_bit_axes_and_keeps_panels_apart(records):
    # perplexities around 170 and 110 give tick labels such as "172.5", wide enough to reach a neighbour
    llama = records.assign(val_ppl_final=records.val_ppl_final + 160)
    opt = records.assign(family="opt", size="125M", val_ppl_final=records.val_ppl_final + 100)
    fig = ppl_vs_rank_figure(normalize(pd.concat([llama, opt], ignore_index=True)))
    assert [ax.get_title() for ax in fig.axes] == ["llama 1.2M, 4-bit", "opt 125M, 4-bit"]  # no 8-bit panel
    four = fig.axes[0]
    (reference,) = [c for c in four.collections if c.get_label() == "8-bit gaussian (int8)"]
    segments = reference.get_segments()
    assert len(segments) == 2  # one per rank
    # at the 8-bit gaussian mean over seeds (160 + 10 and 160 + 11), spanning the rank
    assert sorted(
        (seg[0][1], seg[0][0] < rank < seg[1][0]) for seg, rank in zip(segments, (4, 8), strict=True)
    ) == [
        (170.5, True),
        (170.5, True),
    ]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    left, right = fig.axes
    # the right panel's y-label clears everything the left panel draws (ticks, labels, legend)
    assert left.get_tightbbox(renderer).x1 < right.yaxis.label.get_window_extent(renderer).x0


def test_no_recovered_without_both_baselines(records):
    only4 = records[records.bits == "4"]
    report = build_report(only4)
    assert report.recovered.empty and "recovered_per_family.png" not in report.figures
    assert "needs 4-bit and 8-bit gaussian trials" in report.markdown()


def test_recovered_fraction_matches_every_swept_field_but_the_methods_own():
    swept = ["lora.alpha", "init.method", "quant"]  # grid paths of the sweep

    def rec(method, bits, alpha, ppl):
        extra = {"lora.alpha": alpha, "init.method": method, "quant.method": "nf4" if bits == 4 else "int8"}
        return _rec(method, bits, 8, 0, ppl, 0.5, **extra)

    rows = [
        rec("gaussian", 4, "16", 20.0), rec("gaussian", 8, "16", 10.0), rec("quailora", 4, "16", 15.0),
        rec("gaussian", 4, "32", 30.0), rec("gaussian", 8, "32", 10.0), rec("quailora", 4, "32", 15.0),
        rec("gaussian", 4, "64", 10.0), rec("gaussian", 8, "64", 10.0), rec("quailora", 4, "64", 9.0),
        rec("quailora", 8, "16", 1.0),  # not a baseline: the 8-bit peer is the 8-bit gaussian run
    ]  # fmt: skip
    df = normalize(pd.DataFrame(rows))
    keys = match_keys(df, swept)
    assert keys == ["family", "size", "rank", "seed", "lora.alpha"]  # init.* and quant.* are the method's own
    per_seed = recovered_fraction(df, "val_ppl_final", keys).set_index("lora.alpha")
    # Matched on alpha: (20-15)/(20-10) and (30-15)/(30-10); matching on rank and seed only would average
    # the baselines into one 0.667 for both. No gap at alpha 64: n/a, not inf.
    assert per_seed.loc[16, "recovered"] == pytest.approx(0.5)
    assert per_seed.loc[32, "recovered"] == pytest.approx(0.75)
    assert math.isnan(per_seed.loc[64, "recovered"])

    report = build_report(pd.DataFrame(rows), swept)
    ppl = report.recovered[report.recovered.metric == "perplexity"].set_index("lora.alpha")
    assert ppl.recovered.loc[[16, 32]].tolist() == pytest.approx([0.5, 0.75])
    assert math.isnan(ppl.recovered.loc[64])
    table = report.markdown().split("### Paired comparison")[1]
    assert "n/a" in table and "inf" not in table and "nan" not in table
    assert "one seed: no interval" in table
    assert "n/a" in report.html("t")


def test_init_options_make_a_separate_method_arm():
    assert (
        method_label("quailora", '{"split": "kaiming_a", "iterations": 3}')
        == "quailora iterations-3 split-kaiming_a"
    )
    assert method_label("gaussian", "{}") == method_label("gaussian", None) == "gaussian"
    # init.zero_start is a run param only where true (trials/config.py): its runs are an arm of their own
    assert method_label("svd", "{}", "True") == "svd zero_start"
    assert method_label("svd", '{"split": "kaiming_a"}', "True") == "svd split-kaiming_a zero_start"
    assert method_label("svd", None, None) == "svd"


def test_recovered_fraction_after_init_is_reported_too(records):
    report = build_report(records)
    assert set(report.recovered.metric) == {"perplexity", "perplexity_init", "accuracy"}
    init = report.recovered[
        (report.recovered.metric == "perplexity_init") & (report.recovered.method == "quailora")
    ]
    assert init.recovered.tolist() == pytest.approx([0.8, 0.8])  # val_ppl_init = final + 5 in every run


def test_stage_table_counts_computations_and_the_seconds_reuse_saved(records):
    stages = {"stage.quantize": "reused", "stage.calibrate": "skipped", "stage.initialize": "reused",
              "quantize_seconds": 0.5, "quantize_saved_seconds": 9.0, "calibrate_seconds": 0.0,
              "calibrate_saved_seconds": 0.0, "initialize_seconds": 0.2, "initialize_saved_seconds": 3.0}  # fmt: skip
    df = records.assign(**stages)
    df.loc[0, ["stage.quantize", "quantize_seconds", "quantize_saved_seconds"]] = ["computed", 9.0, 0.0]
    df.loc[1, ["stage.initialize", "initialize_seconds", "initialize_saved_seconds"]] = ["computed", 3.0, 0.0]
    report = build_report(df)
    table = report.stages.set_index("stage")
    n = len(df)
    assert table.loc["quantize", ["computed", "reused", "skipped"]].tolist() == [1, n - 1, 0]
    assert table.loc["quantize", "seconds computed"] == 9.0
    assert table.loc["quantize", "seconds saved"] == pytest.approx(9.0 * (n - 1))
    assert table.loc["calibrate", ["computed", "reused", "skipped"]].tolist() == [0, 0, n]
    assert table.loc["initialize", "seconds computed"] == 3.0
    assert "Cached stages" in report.markdown() and "seconds saved" in report.html("x")
    # A trial the scheduler stopped early ran its stages too: it counts.
    stopped = df.iloc[:1].assign(
        trial="stopped-0", quantize_saved_seconds=9.0, **{"stopped at step": 100, "stage.quantize": "reused"}
    )
    table = build_report(df, stopped=stopped).stages.set_index("stage")
    assert table.loc["quantize", ["computed", "reused"]].tolist() == [1, n]
    assert table.loc["quantize", "seconds saved"] == pytest.approx(9.0 * n)


LR = "train.learning_rate"


def _lr_runs() -> pd.DataFrame:
    """Two learning rates x three seeds per arm. On validation 4-bit QLoRA is best at 1e-3, 8-bit QLoRA and
    QuAILoRA at 1e-4; on test the other rate would look better for each, so choosing there would show."""
    rows = []
    for seed, noise in zip((0, 1, 2), (0.0, 0.3, -0.3), strict=True):
        for method, bits, rate, val, test in (
            ("gaussian", 4, "0.001", 20.0, 21.0), ("gaussian", 4, "0.0001", 25.0, 19.0),
            ("gaussian", 8, "0.0001", 10.0, 11.0), ("gaussian", 8, "0.001", 12.0, 9.0),
            ("quailora", 4, "0.0001", 14.0, 16.0 + noise), ("quailora", 4, "0.001", 18.0, 12.0),
        ):  # fmt: skip
            rows.append(
                _rec(method, bits, 8, seed, val + seed, 0.5, test_ppl_final=test + seed, **{LR: rate})
            )
    return pd.DataFrame(rows)


def test_each_arm_is_shown_at_its_learning_rate_chosen_on_validation_and_scored_on_test():
    report = build_report(_lr_runs(), swept=[LR, "init.method", "quant", "seed"])
    chosen = {(r.bits, r.method): r[LR] for r in report.chosen.to_dict("records") for r in [pd.Series(r)]}
    assert chosen == {(4, "gaussian"): 0.001, (8, "gaussian"): 0.0001, (4, "quailora"): 0.0001}
    assert set(report.chosen["rates compared"]) == {2} and set(report.chosen.seeds) == {3}

    ppl = report.recovered[report.recovered.metric == "perplexity"].iloc[0]
    assert ppl.split == "test" and ppl.seeds == 3 and LR not in report.recovered
    # test values at the chosen rates: p4 = 21 + s, p8 = 11 + s, arm = 16 + s + (0, 0.3, -0.3):
    # p4 - arm = (5, 4.7, 5.3), s = 0.3, half-width t(0.975, 2) · 0.3 / √3 = 0.74524; the gap is 10 in every seed
    assert ppl.vs4 == pytest.approx(-5.0) and (ppl.vs4_lo, ppl.vs4_hi) == pytest.approx(
        (-5.74524, -4.25476), abs=1e-4
    )
    assert ppl.recovered == pytest.approx(0.5)
    assert (ppl.recovered_lo, ppl.recovered_hi) == pytest.approx((0.425476, 0.574524), abs=1e-5)
    assert ppl.straddles_0 == ""

    # the same-rate comparison stays, one row per rate; there p4 at 1e-4 is 4-bit QLoRA's worse rate on validation
    same = report.per_value[report.per_value.metric == "perplexity"].set_index(LR)
    assert sorted(same.index) == [0.0001, 0.001]
    assert same.loc[0.0001, "vs4"] == pytest.approx(16.0 - 19.0)
    text = report.markdown()
    assert (
        "chosen on validation" in text
        and "learning rate chosen on validation (final perplexity on test)" in text
    )


def test_a_rate_chosen_at_the_edge_of_three_or_more_is_marked():
    """QLoRA is best at the highest of its three rates and QuAILoRA at the middle one: only the first may
    do better beyond the grid."""
    rows = []
    for seed in (0, 1, 2):
        for method, bits, vals in (("gaussian", 4, (30.0, 25.0, 20.0)), ("gaussian", 8, (15.0, 12.0, 10.0)),
                                   ("quailora", 4, (22.0, 18.0, 19.0))):  # fmt: skip
            for rate, val in zip(("0.0003", "0.001", "0.003"), vals, strict=True):
                rows.append(_rec(method, bits, 8, seed, val + seed, 0.5, test_ppl_final=val, **{LR: rate}))
    chosen = build_report(pd.DataFrame(rows), swept=[LR, "init.method", "seed"]).chosen
    edge = {(int(r.bits), r.method): (r[LR], r["edge of the rates"]) for _, r in chosen.iterrows()}
    assert edge == {(4, "gaussian"): (0.003, "highest"), (8, "gaussian"): (0.003, "highest"),
                    (4, "quailora"): (0.001, "")}  # fmt: skip
    assert set(build_report(_lr_runs(), swept=[LR]).chosen["edge of the rates"]) == {""}  # 2 rates: no edge


def test_rates_asha_compared_within_each_seed_are_chosen_per_seed_and_every_seed_pairs():
    """ASHA per arm and seed (compare_across: [train.learning_rate]) lets a different rate finish per seed:
    QuAILoRA finished 1e-3 for seed 0 only and 3e-3 for seeds 1 and 2. One rate per arm then pairs only
    the seeds that finished it; chosen per seed, all 3 pair."""
    assert comparison.rate_chosen_per_seed([LR]) and not comparison.rate_chosen_per_seed([LR, "seed"])
    assert not comparison.rate_chosen_per_seed(None) and not comparison.rate_chosen_per_seed(["lora.rank"])
    rows = []
    for seed in (0, 1, 2):
        rows += [_rec("gaussian", 4, 8, seed, 20.0 + seed, 0.5, test_ppl_final=21.0 + seed, **{LR: "0.001"}),
                 _rec("gaussian", 8, 8, seed, 10.0 + seed, 0.5, test_ppl_final=11.0 + seed, **{LR: "0.001"}),
                 _rec("quailora", 4, 8, seed, 14.0 + seed, 0.5, test_ppl_final=16.0 + seed,
                      **{LR: "0.001" if seed == 0 else "0.003"})]  # fmt: skip
    runs = pd.DataFrame(rows)
    per_arm = build_report(runs, swept=[LR, "init.method", "seed"])
    # one rate per arm: 1e-3 (val 14 for its one seed, against 15.5 over two at 3e-3) pairs seed 0 only
    assert per_arm.recovered[per_arm.recovered.metric == "perplexity"].seeds.tolist() == [1]
    per_seed = build_report(runs, swept=[LR, "init.method", "seed"], rate_per_seed=True)
    assert len(per_seed.chosen) == 9 and set(per_seed.chosen.seeds) == {1}  # one rate per arm and seed
    ppl = per_seed.recovered[per_seed.recovered.metric == "perplexity"].iloc[0]
    assert ppl.seeds == 3 and ppl.recovered == pytest.approx(0.5)  # (21 - 16) / (21 - 11) in every seed
    assert (
        "per arm and seed" in per_seed.markdown() and "chosen on validation per seed" in per_seed.markdown()
    )


def test_rates_the_scheduler_stopped_are_listed_beside_the_choice_and_count_among_the_rates_tried():
    """ASHA per seed over 3e-3, 1e-2 and 1e-3: QuAILoRA's seed 0 finished 3e-3 and 1e-2 (1e-2 better, the
    highest of the three tried although only two finished), its seed 1 finished 3e-3 alone."""
    rows, stopped = [], []
    for seed, finished, lost in ((0, {"0.003": 15.0, "0.01": 14.0}, {"0.001": 300}),
                                 (1, {"0.003": 15.0}, {"0.01": 100, "0.001": 100})):  # fmt: skip
        rows += [_rec("gaussian", 4, 8, seed, 20.0, 0.5, test_ppl_final=21.0, **{LR: "0.003"}),
                 _rec("gaussian", 8, 8, seed, 10.0, 0.5, test_ppl_final=11.0, **{LR: "0.003"})]  # fmt: skip
        rows += [
            _rec("quailora", 4, 8, seed, val, 0.5, test_ppl_final=val, **{LR: rate})
            for rate, val in finished.items()
        ]
        stopped += [{**_rec("quailora", 4, 8, seed, 30.0, 0.5, **{LR: rate}), "trial": f"q{seed}-{rate}",
                     "stopped at step": step} for rate, step in lost.items()]  # fmt: skip
    report = build_report(pd.DataFrame(rows), swept=[LR, "init.method", "seed"], stopped=pd.DataFrame(stopped),
                          rate_per_seed=True)  # fmt: skip
    quail = report.chosen[report.chosen.method == "quailora"].set_index("seed")
    assert quail[LR].tolist() == [0.01, 0.003] and quail["rates compared"].tolist() == [2, 1]
    assert quail["edge of the rates"].tolist() == ["highest", ""]
    assert quail["stopped early (rate at step)"].tolist() == ["0.001 at 300", "0.001 at 100, 0.01 at 100"]
    assert set(report.chosen[report.chosen.method == "gaussian"]["stopped early (rate at step)"]) == {""}
    per_arm = build_report(
        pd.DataFrame(rows), swept=[LR, "init.method", "seed"], stopped=pd.DataFrame(stopped)
    )
    quail = per_arm.chosen[per_arm.chosen.method == "quailora"].iloc[
        0
    ]  # one rate over both seeds: seed named
    assert (
        quail["stopped early (rate at step)"]
        == "0.001 at 300 (seed 0), 0.001 at 100 (seed 1), 0.01 at 100 (seed 1)"
    )
    assert "| q0-0.001 " in report.markdown() and "last val_ppl" in report.markdown()  # the stopped table


def test_the_calibration_sets_of_each_calibrated_arm_are_compared_paired_by_seed():
    """Issue 17: is a calibrated init robust to its calibration data? QuAILoRA does 1.0 better with the
    fine-tuning set (per seed 1.0, 1.2, 0.8), closed_form the same with both; QLoRA reads none and runs once."""
    cal, ft, field = "reference:calibration", "reference:finetune-train", "calibration.dataset"
    rows = []
    for seed, noise in zip((0, 1, 2), (0.0, 0.2, -0.2), strict=True):
        rows += [_rec("gaussian", 4, 8, seed, 20.0 + seed, 0.5, **{field: cal}),
                 _rec("gaussian", 8, 8, seed, 10.0 + seed, 0.5, **{field: cal}),
                 _rec("quailora", 4, 8, seed, 15.0 + seed, 0.5, **{field: cal}),
                 _rec("quailora", 4, 8, seed, 14.0 + seed - noise, 0.5, **{field: ft}),
                 _rec("closed_form", 4, 8, seed, 16.0 + seed, 0.5, **{field: cal}),
                 _rec("closed_form", 4, 8, seed, 16.0 + seed, 0.5, **{field: ft})]  # fmt: skip
    report = build_report(pd.DataFrame(rows), swept=[field, "init.method", "seed"])
    effect = report.calibration.set_index("method")
    assert sorted(effect.index) == ["closed_form", "quailora"]  # QLoRA has one calibration value
    q = effect.loc["quailora"]
    assert (q.field, q.value, q.against, q.seeds) == (field, ft, cal, 3)
    # differences (-1.0, -1.2, -0.8): s = 0.2, half-width t(0.975, 2) · 0.2 / √3 = 0.49689
    assert (q.difference, q.difference_lo, q.difference_hi) == pytest.approx(
        (-1.0, -1.49689, -0.50311), abs=1e-4
    )
    assert q["CI contains 0"] == "" and effect.loc["closed_form", "CI contains 0"] == "yes"
    assert "Calibration data" in report.markdown()


def test_each_method_run_with_other_init_options_is_compared_with_its_defaults_paired_by_seed():
    """Issue 17's split question: QuAILoRA with split kaiming_a against its default split, per seed and per
    calibration set; svd ran at its defaults only and has nothing to compare."""
    cal, ft, field = "reference:calibration", "reference:finetune-train", "calibration.dataset"
    rows = []
    for seed, noise in zip((0, 1, 2), (0.0, 0.3, -0.3), strict=True):
        for dataset, shift in ((cal, 0.0), (ft, 2.0)):
            rows += [_rec("gaussian", 4, 8, seed, 20.0 + seed, 0.5, **{field: cal}),
                     _rec("gaussian", 8, 8, seed, 10.0 + seed, 0.5, **{field: cal}),
                     _rec("quailora", 4, 8, seed, 15.0 + seed + shift, 0.5, **{field: dataset}),
                     _rec("quailora split-kaiming_a", 4, 8, seed, 17.0 + seed + shift + noise, 0.5, **{field: dataset}),
                     _rec("svd", 4, 8, seed, 16.0 + seed, 0.5, **{field: cal})]  # fmt: skip
    report = build_report(pd.DataFrame(rows).drop_duplicates(), swept=[field, "init", "seed"])
    effect = report.options.set_index(field)
    assert set(report.options.method) == {"quailora"} and sorted(effect.index) == [cal, ft]
    for dataset in (cal, ft):
        row = effect.loc[dataset]
        assert (row.field, row.value, row.against, row.seeds) == (
            "init.options",
            "split-kaiming_a",
            "(defaults)",
            3,
        )
        # differences (2.0, 2.3, 1.7): s = 0.3, half-width t(0.975, 2) · 0.3 / √3 = 0.74534
        assert (row.difference, row.difference_lo, row.difference_hi) == pytest.approx(
            (2.0, 1.25466, 2.74534), abs=1e-4
        )
        assert row["CI contains 0"] == ""
    assert "Init options" in report.markdown() and "split-kaiming_a" in report.markdown()


def test_without_a_test_metric_nothing_chosen_on_validation_is_reported_as_final():
    runs = _lr_runs().drop(columns="test_ppl_final")
    report = build_report(runs, swept=[LR])
    assert "perplexity" not in set(report.recovered.metric)  # only validation exists: it chose the rate
    assert set(report.per_value.metric) >= {"perplexity"}  # at a fixed rate nothing was chosen
    assert set(report.per_value.split[report.per_value.metric == "perplexity"]) == {"validation"}


def test_runs_that_differ_in_a_sampled_field_are_never_averaged():
    # Optuna/random: every trial draws its own rate; the seed is the only thing a table averages over.
    rows = [_rec(method, bits, 8, seed, 10.0 + i, 0.5, **{LR: str(10 ** -(3 + i / 10))})
            for i, (method, bits, seed) in enumerate(
                [(m, b, s) for m, b in (("gaussian", 4), ("gaussian", 8), ("quailora", 4)) for s in (0, 1)])]  # fmt: skip
    report = build_report(pd.DataFrame(rows), swept=[LR])
    four = report.tables["llama 1.2M, 4-bit"]
    assert len(four) == 4 and set(four.seeds) == {1}  # 4 four-bit runs, 4 rows
    assert sorted(four["val ppl after fine-tuning"]) == [10.0, 11.0, 14.0, 15.0]
    assert len(report.chosen) == 3  # each arm at its best sampled rate (one seed there: no interval)


def _curve(run_id: str, points: dict[int, float]) -> list[dict]:
    return [{"run_id": run_id, "step": step, "val_ppl": value} for step, value in points.items()]


def test_learning_curves_per_arm_and_the_plateau_criterion(records):
    runs = records[(records["rank"] == "8") & (records.quantizer != "int")].reset_index(drop=True)
    runs["run_id"] = [f"r{i}" for i in range(len(runs))]
    shapes = {  # per method and bits: val ppl at steps 0, 100, 200, 300
        ("gaussian", "4"): (30.0, 22.0, 21.0, 20.95),  # -0.24 % over the last 100 steps: a plateau
        ("quailora", "4"): (25.0, 20.0, 18.0, 16.0),  # -11 %: still improving
        ("gaussian", "8"): (15.0, 12.0, 11.0, 10.97),
    }
    curves = pd.DataFrame(
        [p for r in runs.itertuples() for p in _curve(r.run_id, dict(zip((0, 100, 200, 300), shapes[(r.method, r.bits)], strict=True)))]
    )  # fmt: skip
    short = pd.DataFrame(_curve("r0", {0: 30.0, 50: 25.0}))  # a curve shorter than the window
    report = build_report(runs, curves=curves)
    assert report.figures["learning_curves.png"].startswith(PNG_MAGIC)
    table = report.plateau.set_index(["bits", "method"])
    assert table.plateau.loc[[(4, "gaussian"), (4, "quailora")]].tolist() == [True, False]
    assert table.loc[(4, "gaussian"), "improvement %"] == pytest.approx(100 * 0.05 / 21.0)
    assert table.loc[(4, "quailora"), ["last step", "compared with step"]].tolist() == [300, 200]
    # 90 % of the gain from step 0: 4-bit QLoRA by step 200 (30 -> 21.0 of 30 -> 20.95), QuAILoRA only at 300
    assert table.loc[[(4, "gaussian"), (4, "quailora")], "90 % of the gain by step"].tolist() == [200, 300]
    assert "Plateau: val ppl improved by < 0.5 % over the last 100 steps" in report.markdown()
    only_short = build_report(runs[runs.run_id == "r0"], curves=short).plateau.iloc[0]
    assert only_short["plateau"] is None and only_short["last step"] == 50


def test_the_learning_curve_figure_has_a_panel_per_model_and_rank_and_lines_for_other_fields():
    """A calibration sweep at two ranks: two panels (not four), each with QLoRA beside both calibration
    sets of QuAILoRA; only QuAILoRA's lines name a calibration set, since only it reads one."""
    field, rows = "calibration.dataset", []
    for rank in (4, 8):
        for seed in (0, 1):
            rows += [_rec("gaussian", 4, rank, seed, 20.0, 0.5, **{field: "reference:calibration"}),
                     _rec("gaussian", 8, rank, seed, 10.0, 0.5, **{field: "reference:calibration"}),
                     _rec("quailora", 4, rank, seed, 15.0, 0.5, **{field: "reference:calibration"}),
                     _rec("quailora", 4, rank, seed, 14.0, 0.5, **{field: "reference:finetune-train"})]  # fmt: skip
    runs = normalize(pd.DataFrame(rows)).assign(run_id=[f"r{i}" for i in range(len(rows))])
    curves = pd.DataFrame(
        [p for r in runs.itertuples() for p in _curve(r.run_id, {0: 40.0, 100: r.val_ppl_final})]
    )
    keys = match_keys(runs, [field, "init.method", "seed"])
    fig = learning_curves_figure(learning_curves(runs, curves, keys), keys)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["llama 1.2M, rank 4", "llama 1.2M, rank 8"]
    labels = [line.get_label() for line in panels[0].get_lines()]
    assert len(labels) == 4 and sum("dataset=" in label for label in labels) == 2
    assert all("quailora" in label for label in labels if "dataset=" in label)
    # one legend for the figure; each line keeps its color in both panels, no two lines share one
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == labels and not any(ax.get_legend() for ax in panels)
    colors = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in panels]
    assert colors[0] == colors[1] and len(set(colors[0].values())) == 4


def test_a_calibration_sweep_of_the_calibrated_arms_pairs_with_the_one_set_of_qlora_runs():
    # QLoRA reads no calibration data, so the sweep runs it once; each calibration set of QuAILoRA is paired with it.
    cal = "calibration.dataset"
    rows = []
    for seed in (0, 1):
        rows += [
            _rec("gaussian", 4, 8, seed, 20.0 + seed, 0.5, **{cal: "reference:calibration"}),
            _rec("gaussian", 8, 8, seed, 10.0 + seed, 0.5, **{cal: "reference:calibration"}),
            _rec("quailora", 4, 8, seed, 15.0 + seed, 0.5, **{cal: "reference:calibration"}),
            _rec("quailora", 4, 8, seed, 12.0 + seed, 0.5, **{cal: "reference:finetune-train"}),
        ]
    report = build_report(pd.DataFrame(rows), swept=[cal, "init", "quant", "seed"])
    ppl = report.recovered[report.recovered.metric == "perplexity"].set_index(cal)
    assert ppl.recovered.to_dict() == pytest.approx(
        {"reference:calibration": 0.5, "reference:finetune-train": 0.8}
    )
    assert set(ppl.seeds) == {2}


def test_the_steps_the_scheduler_saved_are_counted_only_when_every_run_says_its_budget(records):
    stopped = pd.DataFrame({"trial": ["a", "b"], "stopped at step": [10, 30], "train.max_steps": [100, 100]})
    budgeted = records.assign(**{"train.max_steps": "100"})  # as MLflow logs it: a string
    note = build_report(budgeted, stopped=stopped).stopped_note
    assert note == (
        f"2 of {len(records) + 2} trials stopped early: the sweep trained {100 * len(records) + 40:,} of the"
        f" {100 * (len(records) + 2):,} optimizer steps its trials were set to, 7 % fewer."  # 160 of 2,200
    )
    assert build_report(records, stopped=stopped).stopped_note == ""  # runs from before the param was read


def test_arms_are_also_compared_averaged_over_models_and_ranks():
    """Two models, 3 seeds: QuAILoRA is 1.0 better than 4-bit QLoRA on llama (per seed 1.0, 0.8, 1.2) and 2.0
    on opt (2.0, 1.7, 2.3); averaged over the two cells 1.5 with the stratified interval, paired within each.
    kaiming_a against the default split: +0.5 on llama, -0.5 on opt, 0 on average. svd ran on llama only."""
    rows = []
    for family, p4, p8, gain, seed_noise, split in (
        ("llama", 20.0, 10.0, 1.0, (0.0, 0.2, -0.2), (0.5, 0.7, 0.3)),
        ("opt", 30.0, 25.0, 2.0, (0.0, 0.3, -0.3), (-0.5, -0.4, -0.6)),
    ):
        path = {"model.path": f"reference:{family}-mini"}
        for seed, noise, kaiming in zip((0, 1, 2), seed_noise, split, strict=True):
            arm = p4 + seed - gain + noise
            rows += [_rec("gaussian", 4, 8, seed, p4 + seed, 0.5, family=family, **path),
                     _rec("gaussian", 8, 8, seed, p8 + seed, 0.5, family=family, **path),
                     _rec("quailora", 4, 8, seed, arm, 0.5, family=family, **path),
                     _rec("quailora split-kaiming_a", 4, 8, seed, arm + kaiming, 0.5, family=family, **path)]  # fmt: skip
            if family == "llama":
                rows.append(_rec("svd", 4, 8, seed, p4 + seed, 0.5, family=family, **path))
    report = build_report(pd.DataFrame(rows), swept=["model.path", "init", "quant", "seed"])
    per_cell = report.recovered[report.recovered.metric == "perplexity"]
    assert len(per_cell[per_cell.method == "quailora"]) == 2  # one row per model, as before
    pooled = report.pooled[report.pooled.metric == "perplexity"].set_index("method")
    assert "svd" not in pooled.index and "family" not in pooled and "model.path" not in pooled
    quail = pooled.loc["quailora"]
    assert (quail.cells, quail.seeds) == (2, 6) and "recovered" not in pooled
    half = 2.94617 * 0.1040833  # t(0.975, 3.48454) · SE, as in test_stratified_interval_by_hand
    assert (quail.vs4, quail.vs4_lo, quail.vs4_hi) == pytest.approx(
        (-1.5, -1.5 - half, -1.5 + half), abs=1e-4
    )
    # against 8-bit: llama 9 + noise, opt 3 + noise: the same spreads around 6
    assert (quail.vs8, quail.vs8_lo) == pytest.approx((6.0, 6.0 - half), abs=1e-4)
    assert quail.straddles_0 == ""
    options = report.options_pooled.set_index("method").loc["quailora"]
    assert (options.value, options.cells, options.seeds) == ("split-kaiming_a", 2, 6)
    assert options.difference == pytest.approx(0.0) and options["CI contains 0"] == "yes"
    assert len(report.options) == 2  # and each model's own row, where each excludes 0
    assert set(report.options["CI contains 0"]) == {""}
    text = report.markdown()
    assert "averaged over models and ranks" in text and "Welch-Satterthwaite" in text
    one_model = build_report(
        pd.DataFrame([r for r in rows if r["family"] == "llama"]), swept=["init", "seed"]
    )
    assert one_model.pooled.empty and one_model.options_pooled.empty  # one cell: nothing to average over


def _precision_runs() -> pd.DataFrame:
    """Issue 29: NF4, group-wise INT3 (groups of 64 and 128) and 8-bit runs, 3 seeds, a large seed effect (5 per
    seed) that only pairing by seed takes out. QuAILoRA on INT3-g64 is 6 better than gaussian INT3-g64 (per
    seed 6, 5.5, 6.5), whose gap to 8-bit is 30; on NF4 it recovers half of a gap of 10. svd on INT2 has no
    2-bit QLoRA beside it."""
    rows = []
    for seed, noise in zip((0, 1, 2), (0.0, 0.5, -0.5), strict=True):
        for method, bits, quantizer, group, ppl in (
            ("gaussian", 8, "int8", 64, 10.0), ("gaussian", 4, "nf4", 64, 20.0), ("quailora", 4, "nf4", 64, 15.0),
            ("gaussian", 3, "int", 64, 40.0),
            ("gaussian", 3, "int", 128, 50.0),  # another INT3 precision: not the g64 arm's baseline
            ("quailora", 3, "int", 64, 34.0 + noise), ("svd", 2, "int", 64, 60.0),
        ):  # fmt: skip
            rows.append(_rec(method, bits, 8, seed, ppl + 5.0 * seed, 0.5, quantizer=quantizer,
                             **{"quant.group_size": str(group)}))  # fmt: skip
    return pd.DataFrame(rows)


def test_the_quantizer_label_names_bits_and_the_group_size_of_group_wise_int_k():
    assert comparison.precision_label("int", 3, 64) == "int3-g64"
    assert comparison.precision_label("int", 8, 32.0) == "int8-g32"  # not LLM.int8's label
    assert comparison.precision_label("int", 2, None) == "int2-g?"
    assert comparison.precision_label("nf4", 4, 64) == "nf4"  # no group size: bitsandbytes blocks instead
    assert comparison.precision_label("int8", 8, 64) == "int8"
    assert comparison.precision_label("int3-g64", 3) == "int3-g64"  # a label already: kept
    df = normalize(_precision_runs())
    assert set(df.quantizer) == {"int8", "nf4", "int3-g64", "int3-g128", "int2-g64"}
    assert normalize(df).quantizer.tolist() == df.quantizer.tolist()  # normalizing again changes nothing


def test_an_int3_arm_is_paired_by_seed_with_int3_qlora_against_the_8_bit_reference():
    per_seed = recovered_fraction(normalize(_precision_runs()), "val_ppl_final")
    int3 = per_seed[per_seed.quantizer == "int3-g64"].sort_values("seed")
    assert int3.method.tolist() == ["quailora"] * 3 and int3.bits.tolist() == [3] * 3
    assert int3.p4.tolist() == [40.0, 45.0, 50.0]  # gaussian INT3-g64 of the same seed, not g128's or NF4's
    assert int3.p8.tolist() == [10.0, 15.0, 20.0]  # the 8-bit run of the same seed
    assert int3.recovered.tolist() == pytest.approx([6 / 30, 5.5 / 30, 6.5 / 30])
    nf4 = per_seed[per_seed.quantizer == "nf4"]
    assert nf4.recovered.tolist() == pytest.approx([0.5] * 3)  # the 4-bit arm as before
    assert "svd" not in set(per_seed.method)  # no 2-bit QLoRA: no baseline, never the 4- or 3-bit one

    report = build_report(_precision_runs())
    ppl = report.recovered[report.recovered.metric == "perplexity"].set_index(["method", "quantizer"])
    assert sorted(ppl.index) == [("quailora", "int3-g64"), ("quailora", "nf4")]
    arm = ppl.loc[("quailora", "int3-g64")]
    # p4 - arm per seed (6, 5.5, 6.5): s = 0.5, half-width t(0.975, 2) · 0.5 / √3 = 1.24207. Unpaired, the
    # seed effect (s = 5) would widen it tenfold. The gap is 30 in every seed, so Fieller's interval is /30.
    assert arm.seeds == 3
    assert (arm.vs4, arm.vs4_lo, arm.vs4_hi) == pytest.approx((-6.0, -7.24207, -4.75793), abs=1e-4)
    assert arm.vs8 == pytest.approx(24.0)  # against the 8-bit reference, not against NF4 or INT3 QLoRA
    assert (arm.recovered, arm.recovered_lo, arm.recovered_hi) == pytest.approx(
        (0.2, 4.75793 / 30, 7.24207 / 30), abs=1e-5
    )
    assert arm.straddles_0 == ""
    assert arm.vs4_p == pytest.approx(stats.ttest_1samp([-6.0, -5.5, -6.5], 0.0).pvalue)
    assert arm.vs4_holm == arm.vs4_p  # the only arm against INT3-g64 QLoRA: a family of one
    # against 8-bit QLoRA the INT3 and NF4 arms share one baseline: a family of two
    pair = [ppl.loc[(m, q), "vs8_p"] for m, q in [("quailora", "int3-g64"), ("quailora", "nf4")]]
    assert [ppl.loc[(m, q), "vs8_holm"] for m, q in [("quailora", "int3-g64"), ("quailora", "nf4")]] == (
        pytest.approx(holm(pair))
    )
    nf4 = ppl.loc[("quailora", "nf4")]
    assert (
        nf4.recovered == pytest.approx(0.5)
        and nf4.vs4 == pytest.approx(-5.0)
        and nf4.vs8 == pytest.approx(5.0)
    )
    text = report.markdown()
    assert "| int3-g64 " in text and "Δ vs same-bit QLoRA" in text and "Holm p vs same-bit" in text
    assert "llama 1.2M, 3-bit" in report.tables  # and the per-bit table names the group size
    assert set(report.tables["llama 1.2M, 3-bit"].quantizer) == {"int3-g64", "int3-g128"}


def test_the_straddle_column_names_the_arms_own_bits():
    rows = _precision_runs()
    arm = (rows.method == "quailora") & (rows.quantizer == "int")
    # INT3 QuAILoRA 1 worse, 1 better, 0 better than INT3 QLoRA (40 + 5·seed): its interval against INT3 spans 0
    rows.loc[arm, "val_ppl_final"] = [41.0, 44.0, 50.0]
    table = build_report(rows).recovered.set_index(["metric", "quantizer"])
    assert table.loc[("perplexity", "int3-g64"), "straddles_0"] == "vs 3-bit"
    assert table.loc[("perplexity", "nf4"), "straddles_0"] == ""  # 5 better in every seed


def test_recovered_metrics_name_the_precision_when_a_sweep_has_more_than_one():
    report = build_report(_precision_runs())
    metrics = recovered_metrics(report.recovered[report.recovered.metric == "perplexity"])
    assert metrics == pytest.approx({"recovered_perplexity_llama_1.2M_quailora_r8_int3-g64": 0.2,
                                     "recovered_perplexity_llama_1.2M_quailora_r8_nf4": 0.5})  # fmt: skip
    only_nf4 = report.recovered[
        (report.recovered.metric == "perplexity") & (report.recovered.quantizer == "nf4")
    ]
    assert list(recovered_metrics(only_nf4)) == [
        "recovered_perplexity_llama_1.2M_quailora_r8"  # one precision: the name as before
    ]


def test_a_new_table_is_one_section_builder_and_the_report_renders_it(records):
    """A builder added to the list of sections is rendered after the others with its title and note, in
    markdown and HTML, and its numbers are report.<its name>; a section whose table is empty is left out."""

    def runs_per_method(sweep: SweepRuns) -> Section:
        table = sweep.runs.groupby("method", as_index=False).agg(
            runs=("seed", "size"), best=("val_ppl_final", "min")
        )
        return Section("runs_per_method", "Runs per method", table, note="Finished runs only.")

    def nothing(sweep: SweepRuns) -> Section:
        return Section("nothing", "Nothing to show", pd.DataFrame())

    report = build_report(records, sections=(*SECTIONS, runs_per_method, nothing))
    assert report.runs_per_method.set_index("method").runs.to_dict() == {
        "gaussian": 12, "quailora": 4, "qalora_closed_form": 4
    }  # fmt: skip
    text = report.markdown()
    assert text == build_report(records).markdown() + (
        "\n\n### Runs per method\n\nFinished runs only.\n\n"
        "| method             |   runs |   best |\n"
        "|:-------------------|-------:|-------:|\n"
        "| gaussian           |     12 | 10.000 |\n"
        "| qalora_closed_form |      4 | 25.000 |\n"
        "| quailora           |      4 | 12.500 |"
    )
    page = report.html("t")
    assert "<h2>Runs per method</h2><p>Finished runs only.</p><table" in page and "<td>12.500</td>" in page
    assert "Nothing to show" not in text + page
    assert report.nothing.empty
    with pytest.raises(AttributeError):
        report.no_such_section  # noqa: B018
    # every listed builder names its own section (the per model and bit width tables share one name)
    names = [s.name for s in build_report(records).sections if s.name != "tables"]
    assert len(names) == len(set(names)) == len(SECTIONS) - 1
