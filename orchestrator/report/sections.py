"""The report's tables. Each is a `Section` made by one builder, a function of the sweep's runs
(records.SweepRuns) that returns a Section or a list of them; the title and the note of a table live in its
builder. `SECTIONS` lists the builders in reading order: a new table is one function added there (and its
test). A section whose table is empty is left out of the report, unless it says what to show instead."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from orchestrator.comparison import (
    MODEL_KEYS,
    calibration_effect,
    comparison_metrics,
    options_effect,
    paired_comparison,
)
from orchestrator.curves import PLATEAU_TOLERANCE, PLATEAU_WINDOW, plateau
from orchestrator.paired import LEVEL
from orchestrator.report.records import MAX_STEPS, STOPPED_VAL_PPL, SweepRuns
from trials.contract import (
    BITS_TAG,
    METHOD_TAG,
    MODEL_SIZE_MB,
    QUANTIZER_TAG,
    RANK_TAG,
    SEED_TAG,
    STAGES,
    STEP,
    TEST_PPL_FINAL,
    VAL_PPL,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
    stage_saved_seconds,
    stage_seconds,
)

NA = "n/a"
OVER_CELLS = (
    ", averaged over models and ranks"  # the title of a table's over-cells companion: its title + this
)
OVER_CELLS_NOTE = (
    f"Each model and rank (a cell) weighs the same; pairs are formed within a cell and seed. {100 * LEVEL:g} % "
    "stratified t interval from the within-cell spread (Welch-Satterthwaite degrees of freedom): the average "
    "effect over these cells, not a claim about other models."
)
PAIRED_NOTE = (
    f"Δ = arm - QLoRA baseline, paired by seed: mean difference with its {100 * LEVEL:g} % paired-t interval. "
    "Same-bit QLoRA is QLoRA at the arm's own precision (the quantizer column: bits, and group size for "
    "group-wise INT-k), or the mean of the QLoRA runs at its bits where the sweep has none at that precision. "
    f"recovered = mean(p4 - arm) / mean(p4 - p8) with Fieller's {100 * LEVEL:g} % interval, "
    "p4 the same-bit QLoRA value and p8 the 8-bit one (unbounded when that gap itself is not distinguishable "
    "from 0). 'CI contains 0' names the intervals that contain 0; each interval is for its arm alone. The Holm "
    "columns are each t test's p-value adjusted within the arms that share its baseline runs (same-bit: the "
    "arms of one model, rank and precision; 8-bit: of one model and rank): count an arm as better than a "
    "shared baseline only where its Holm p is below 0.05."
)


@dataclass(frozen=True, eq=False)
class Section:
    """One titled table of the report. `name`: how code asks for its numbers (SweepReport.<name>). `table`: the
    numbers as computed; `display` turns them into what a reader sees (an estimate and its interval in one
    cell). `floatfmt`: the numbers' format, "" for each as it is. `note`: a paragraph under the title.
    `if_empty`: text shown in place of an empty table, which is otherwise left out."""

    name: str
    title: str
    table: pd.DataFrame
    note: str = ""
    floatfmt: str = ".3f"
    display: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    if_empty: str = ""

    def content(self) -> pd.DataFrame | str | None:
        """What the report shows under the title: a table, a text, or None to leave the section out."""
        if self.table.empty:
            return self.if_empty or None
        return _params_shown(self.display(self.table) if self.display else self.table)


SectionBuilder = Callable[[SweepRuns], "Section | Sequence[Section]"]


def _params_shown(table: pd.DataFrame) -> pd.DataFrame:
    """Field columns ('train.learning_rate') at full precision: the tables' fixed 3 decimals would show 1e-4 as 0."""
    params = [c for c in table.columns if "." in c and pd.api.types.is_float_dtype(table[c])]
    return table.assign(**{c: table[c].map(lambda v: NA if pd.isna(v) else f"{v:g}") for c in params})


def _interval(estimate: float, lo: float, hi: float) -> str:
    if math.isnan(estimate):
        return NA
    if math.isnan(lo):
        return f"{estimate:.3f} (one seed: no interval)"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{estimate:.3f} [unbounded]"
    return f"{estimate:.3f} [{lo:.3f}, {hi:.3f}]"


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    """The paired comparison as a reader sees it: each estimate with its interval in one cell."""
    numeric = {
        f"{name}{suffix}"
        for name in ("vs4", "vs8", "recovered")
        for suffix in ("", "_lo", "_hi", "_p", "_holm")
    }
    shown = comparison[[c for c in comparison.columns if c not in numeric and c != "straddles_0"]].copy()
    estimates = (("vs4", "Δ vs same-bit QLoRA"), ("vs8", "Δ vs 8-bit QLoRA"), ("recovered", "recovered"))
    for name, title in [(n, t) for n, t in estimates if n in comparison]:  # over cells: no recovered
        shown[title] = [
            _interval(*values)
            for values in comparison[[name, f"{name}_lo", f"{name}_hi"]].itertuples(index=False)
        ]
    shown["CI contains 0"] = comparison["straddles_0"]
    for name, title in (("vs4", "Holm p vs same-bit"), ("vs8", "Holm p vs 8-bit")):
        shown[title] = comparison[f"{name}_holm"].map(lambda p: NA if pd.isna(p) else f"{p:.3g}")
    return shown


def difference_display(table: pd.DataFrame) -> pd.DataFrame:
    """A table of paired differences with each estimate and its interval in one cell."""
    shown = table.drop(columns=["difference", "difference_lo", "difference_hi"])
    shown.insert(len(shown.columns) - 1, "difference", [
        _interval(*values) for values in table[["difference", "difference_lo", "difference_hi"]].itertuples(index=False)
    ])  # fmt: skip
    return shown


PAIRED = {"floatfmt": "", "display": comparison_display}  # a paired comparison's Section fields
PAIRED_EFFECT = {"floatfmt": "", "display": difference_display}  # a paired effect's (calibration, options)


# --- per model and bit width ------------------------------------------------------------------------------


def method_tables(df: pd.DataFrame, extra: Sequence[str] = ()) -> dict[str, pd.DataFrame]:
    """Per model and bit width: the mean over seeds per method, quantizer, rank and other swept field."""
    cols = {VAL_PPL_INIT: "val ppl after init", VAL_PPL_FINAL: "val ppl after fine-tuning",
            TEST_PPL_FINAL: "test ppl after fine-tuning", "accuracy": "accuracy",
            MODEL_SIZE_MB: "model MB"}  # fmt: skip
    present = {k: v for k, v in cols.items() if k in df and df[k].notna().any()}
    tables = {}
    for (family, size, bits), group in df.groupby([*MODEL_KEYS, BITS_TAG], sort=True):
        table = group.groupby(
            [METHOD_TAG, QUANTIZER_TAG, RANK_TAG, *extra], as_index=False, dropna=False
        ).agg(seeds=(SEED_TAG, "nunique"), **{label: (col, "mean") for col, label in present.items()})
        tables[f"{family} {size}, {bits}-bit"] = table
    return tables


def per_model(sweep: SweepRuns) -> list[Section]:
    """One table per model and bit width (method_tables): report.tables."""
    return [
        Section("tables", title, table) for title, table in method_tables(sweep.runs, sweep.extra).items()
    ]


# --- learning rates and the paired comparison -------------------------------------------------------------

CHOSEN_TITLE = "Learning rate per arm, chosen on validation (lowest mean val_ppl_final over seeds)"
CHOSEN_PER_SEED_TITLE = (
    "Learning rate per arm and seed, chosen on validation (lowest val_ppl_final of the rates ASHA let finish)"
)


def chosen(sweep: SweepRuns) -> Section:
    """The learning rate chosen per arm (comparison.choose_learning_rate), when the sweep swept it."""
    return Section("chosen", CHOSEN_PER_SEED_TITLE if sweep.rate_per_seed else CHOSEN_TITLE, sweep.chosen)


NO_BASELINES = (
    "(needs 4-bit and 8-bit gaussian trials at matching rank, seed and other swept fields; "
    "an arm at 3 or 2 bits needs gaussian trials at its own bits in place of the 4-bit ones)"
)


def paired_title(sweep: SweepRuns) -> str:
    """The main comparison's title, which its over-cells companion extends."""
    if not sweep.rate_swept:
        return f"Paired comparison by seed ({sweep.split} split)"
    each = "per seed " if sweep.rate_per_seed else ""
    return f"Paired comparison by seed, each arm at its learning rate chosen on validation {each}(final perplexity on test)"


def recovered(sweep: SweepRuns) -> Section:
    """Every arm below 8 bits against QLoRA at its own precision and 8-bit QLoRA, paired by seed."""
    table = sweep.recovered
    note = PAIRED_NOTE if not table.empty else ""
    return Section("recovered", paired_title(sweep), table, note, **PAIRED, if_empty=NO_BASELINES)


def pooled(sweep: SweepRuns) -> Section:
    """The paired comparison averaged over models and ranks."""
    table = paired_comparison(sweep.shown, sweep.compared, sweep.metrics, over_cells=True)
    return Section("pooled", paired_title(sweep) + OVER_CELLS, table, OVER_CELLS_NOTE, **PAIRED)


PER_VALUE_TITLE = "Paired comparison at each learning rate (every arm at the same rate)"


def per_value(sweep: SweepRuns) -> Section:
    """With a learning rate chosen per arm: the paired comparison at each rate as well."""
    runs, table = sweep.runs, pd.DataFrame()
    if sweep.rate_swept:
        table = paired_comparison(runs, sweep.keys, comparison_metrics(runs, selected=False))
    note = PAIRED_NOTE if not sweep.recovered.empty else ""
    return Section("per_value", PER_VALUE_TITLE, table, note, **PAIRED)


# --- calibration data and init options --------------------------------------------------------------------

CALIBRATION_TITLE = (
    "Calibration data: each calibrated arm's final perplexity ({split} split) with one calibration set minus"
    " with another, paired by seed"
)
OPTIONS_TITLE = (
    "Init options: each method's final perplexity ({split} split) with other options minus with its defaults,"
    " paired by seed"
)


def _effect(sweep: SweepRuns, name: str, title: str, effect, over_cells: bool = False) -> Section:
    """A paired effect (comparison.calibration_effect, options_effect) of the shown runs on their final
    perplexity; none where that perplexity is the split that chose their learning rates."""
    table = pd.DataFrame()
    if sweep.scored:
        table = effect(sweep.shown, sweep.keys, sweep.value, over_cells=over_cells)
    title = title.format(split=sweep.split)
    if over_cells:
        return Section(name, title + OVER_CELLS, table, OVER_CELLS_NOTE, **PAIRED_EFFECT)
    return Section(name, title, table, **PAIRED_EFFECT)


def calibration(sweep: SweepRuns) -> Section:
    """Each calibrated arm with one calibration set against another."""
    return _effect(sweep, "calibration", CALIBRATION_TITLE, calibration_effect)


def calibration_pooled(sweep: SweepRuns) -> Section:
    return _effect(sweep, "calibration_pooled", CALIBRATION_TITLE, calibration_effect, over_cells=True)


def options(sweep: SweepRuns) -> Section:
    """Each method with other init options against its defaults."""
    return _effect(sweep, "options", OPTIONS_TITLE, options_effect)


def options_pooled(sweep: SweepRuns) -> Section:
    return _effect(sweep, "options_pooled", OPTIONS_TITLE, options_effect, over_cells=True)


# --- learning curves, stages, stopped trials --------------------------------------------------------------

PLATEAU_TITLE = (
    f"Plateau: val ppl improved by < {100 * PLATEAU_TOLERANCE:g} % over the last {PLATEAU_WINDOW} steps"
)


def plateau_table(mean: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per panel and arm: plateau() of its mean learning curve."""
    by = [c for c in mean.columns if c not in (STEP, VAL_PPL)]
    rows = [
        {**dict(zip(by, group, strict=True)), **plateau(curve.set_index(STEP)[VAL_PPL])}
        for group, curve in mean.groupby(by, dropna=False, sort=True)
    ]
    return pd.DataFrame(rows)


def plateaus(sweep: SweepRuns) -> Section:
    """Per arm: did its mean learning curve flatten."""
    mean = sweep.mean_curves
    return Section(
        "plateau", PLATEAU_TITLE, pd.DataFrame() if mean.empty else plateau_table(mean, sweep.keys)
    )


STAGES_TITLE = "Cached stages: computed once per key, reused by every other trial"


def stage_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per stage: how many trials computed it, found it computed ahead by the sweep's stage jobs
    (precomputed), reused or skipped it, the seconds spent computing in trials, and the seconds the reuses
    saved (what computing the entry took, less what the trial waited on another's computation of it).
    ``df``: every trial that ran its stages, the ones the scheduler stopped early included."""
    rows = []
    for stage in STAGES:
        status = df.get(f"stage.{stage}")
        if status is None or status.isna().all():
            continue
        computed = status == "computed"
        rows.append(
            {
                "stage": stage,
                "computed": int(computed.sum()),
                "precomputed": int((status == "precomputed").sum()),
                "reused": int((status == "reused").sum()),
                "skipped": int((status == "skipped").sum()),
                "seconds computed": float(df.loc[computed, stage_seconds(stage)].sum()),
                "seconds saved": float(df[stage_saved_seconds(stage)].fillna(0).sum()),
            }
        )
    return pd.DataFrame(rows)


def stages(sweep: SweepRuns) -> Section:
    """Per cached stage: runs and seconds, the trials stopped early included."""
    runs = sweep.runs if sweep.stopped.empty else pd.concat([sweep.runs, sweep.stopped], ignore_index=True)
    return Section("stages", STAGES_TITLE, stage_table(runs), floatfmt=".1f")


STOPPED_TITLE = "Stopped early by the scheduler (not in the tables above)"
STOPPED_COLUMNS = ["trial", "stopped at step", MAX_STEPS, STOPPED_VAL_PPL]  # the stopped table shows these


def steps_saved(df: pd.DataFrame, stopped: pd.DataFrame) -> str:
    """How many optimizer steps the scheduler saved: the stopped trials' steps against what every trial was
    set to train (a finished trial counted at its max_steps)."""
    if stopped.empty or MAX_STEPS not in df or MAX_STEPS not in stopped:
        return ""
    if df[MAX_STEPS].isna().any() or stopped[[MAX_STEPS, "stopped at step"]].isna().any().any():
        return ""  # runs from before max_steps was read: no sum to trust
    budget = int(df[MAX_STEPS].sum() + stopped[MAX_STEPS].sum())
    trained = int(df[MAX_STEPS].sum() + stopped["stopped at step"].sum())
    return (
        f"{len(stopped)} of {len(df) + len(stopped)} trials stopped early: the sweep trained {trained:,} of the"
        f" {budget:,} optimizer steps its trials were set to, {100 * (1 - trained / budget):.0f} % fewer."
    )


def stopped(sweep: SweepRuns) -> Section:
    """The trials the scheduler stopped early (trial, step, val_ppl), with what stopping them saved."""
    note = steps_saved(sweep.runs, sweep.stopped)
    return Section(
        "stopped", STOPPED_TITLE, sweep.stopped, note, display=lambda t: t.reindex(columns=STOPPED_COLUMNS)
    )


# The report's tables in reading order: a new table is a builder added here.
SECTIONS: tuple[SectionBuilder, ...] = (
    per_model,
    chosen,
    recovered,
    pooled,
    per_value,
    calibration,
    calibration_pooled,
    options,
    options_pooled,
    plateaus,
    stages,
    stopped,
)


def build_sections(sweep: SweepRuns, builders: Sequence[SectionBuilder] = SECTIONS) -> list[Section]:
    """Every builder's sections, in the builders' order."""
    made = [build(sweep) for build in builders]
    return [s for one in made for s in ([one] if isinstance(one, Section) else one)]
