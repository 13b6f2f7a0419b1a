"""Report tables, the recovered fraction, plots and the HTML page, from a table of trial records."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from orchestrator.report import (
    build_report,
    match_keys,
    method_label,
    normalize,
    ppl_vs_rank_figure,
    recovered_fraction,
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
    assert row["ppl after fine-tuning"] == pytest.approx(((20 - 7.5) + (21 - 8.5)) / 2)
    assert row["ppl after init"] == pytest.approx(row["ppl after fine-tuning"] + 5)
    assert row["seeds"] == 2 and row["model MB"] == 1.0
    assert set(four.method) == {"gaussian", "quailora", "qalora_closed_form"}

    rec = report.recovered.set_index(["metric", "method", "rank"])
    assert rec.loc[("perplexity", "quailora", 4), "recovered_mean"] == pytest.approx(0.80)
    assert rec.loc[("perplexity", "quailora", 4), "recovered_std"] == pytest.approx(math.sqrt(0.005))
    assert rec.loc[("accuracy", "quailora", 8), "recovered_mean"] == pytest.approx(0.5)

    assert set(report.figures) == {"ppl_vs_rank.png", "recovered_per_family.png"}
    assert all(png.startswith(PNG_MAGIC) for png in report.figures.values())
    written = report.write(tmp_path, "sweep t")
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http" not in page  # self-contained
    assert "0.800" in report.markdown()
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
    assert per_seed.loc["16", "recovered"] == pytest.approx(0.5)
    assert per_seed.loc["32", "recovered"] == pytest.approx(0.75)
    assert math.isnan(per_seed.loc["64", "recovered"])

    report = build_report(pd.DataFrame(rows), swept)
    ppl = report.recovered[report.recovered.metric == "perplexity"].set_index("lora.alpha")
    assert ppl.recovered_mean.loc[["16", "32"]].tolist() == pytest.approx([0.5, 0.75])
    table = report.markdown().split("### Recovered fraction")[1]
    assert "n/a" in table and "inf" not in table and "nan" not in table
    assert "n/a" in report.html("t")


def test_init_options_make_a_separate_method_arm():
    assert (
        method_label("quailora", '{"split": "kaiming_a", "iterations": 3}')
        == "quailora iterations-3 split-kaiming_a"
    )
    assert method_label("gaussian", "{}") == method_label("gaussian", None) == "gaussian"


def test_recovered_fraction_after_init_is_reported_too(records):
    from orchestrator.report import summarize_recovered

    summary = summarize_recovered(normalize(records))
    assert set(summary.metric) == {"perplexity", "perplexity_init", "accuracy"}
    init = summary[(summary.metric == "perplexity_init") & (summary.method == "quailora")]
    assert init.recovered_mean.tolist() == pytest.approx([0.8, 0.8])  # val_ppl_init = final + 5 in every run


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
