"""How a sweep's arms are compared: which runs are peers, the learning rate each arm is shown at, and every
arm below 8 bits against QLoRA at its own precision and 8-bit QLoRA, paired by seed.

An arm is a bit width, init method (with its options) and quantizer. The quantizer is named by its precision
(precision_label: 'nf4', 'int8', 'int3-g64' for group-wise INT3 with groups of 64), so the arms of one method
at different bit widths or group sizes stay apart. Runs are peers when they agree on model, rank, seed and
every other swept or sampled field outside the method's own sections (init.*, quant.*). Seeds are the only
thing averaged or paired over: runs that differ in any swept or sampled field are never averaged together.
When the sweep varies `train.learning_rate`, each arm can also be shown at its own learning rate, the one with
the lowest mean validation perplexity over seeds (chosen on validation); the numbers shown for it then come
from the test split.

recovered = mean(p4 - p4m) / mean(p4 - p8) over seeds, with p4m the arm's value, p4 the QLoRA (gaussian) value
at the arm's own precision (its quantizer, bits and group size where the sweep ran QLoRA there, else QLoRA at
the same bit width: never another bit width) and p8 the 8-bit QLoRA value, the reference (methods.md; the
columns keep the paper's 4-bit names at every bit width). No registered quantizer stores more than 8 bits, so
8-bit QLoRA is the best-precision arm a sweep can run. A ratio of mean paired differences, not a mean of
per-seed ratios, which one seed with a near-zero gap can drive to any size.

Across models and ranks (`over_cells`), each difference is also averaged over the sweep's cells (a model and
rank each), every cell weighted equally, with a stratified interval (paired.stratified_mean_ci): pairs are
still formed within a cell and seed only, so nothing from different configurations is averaged as if a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from orchestrator.paired import NO_GAP, Interval, holm, ratio_ci, stratified_mean_ci
from quailora.initializers import needs_gram
from quailora.quantizers import QUANTIZER_SPECS, quantizer_spec
from trials.contract import (
    BITS_TAG,
    FAMILY_TAG,
    METHOD_TAG,
    QUANTIZER_TAG,
    RANK_TAG,
    SEED_TAG,
    SIZE_TAG,
    TEST_PPL_FINAL,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
)

BASELINE = "gaussian"
MODEL_KEYS = [FAMILY_TAG, SIZE_TAG]
MODEL_SECTION = "model"  # the sweep fields that choose the model (model.path): a cell like MODEL_KEYS
MATCH_KEYS = [*MODEL_KEYS, RANK_TAG, SEED_TAG]  # from trial tags; the other swept fields come from run params
ARM = [BITS_TAG, METHOD_TAG, QUANTIZER_TAG]
CALIBRATION_SECTION = "calibration"
METHOD_SECTIONS = ("init", "quant")  # where a method differs from its 4- and 8-bit gaussian peers
SEED_PATH = "seed"  # the sweep field of the seed
TAGGED_PARAMS = ("lora.rank", SEED_PATH)  # params MATCH_KEYS already carry
LEARNING_RATE = "train.learning_rate"  # the field an arm may be shown at its best value of
CHOSEN_ON = "val ppl (chosen on)"  # the chosen-rate table's column of the validation mean
INIT_OPTIONS = "init options"  # options_effect's column: a method's options, as its label spells them
METHOD_DEFAULTS = "(defaults)"  # sorts before any option label (`split-kaiming_a`): the one compared against
GRID_EDGE = "edge of the rates"  # "lowest"/"highest" when the chosen rate is the end of 3+ rates tried
STOPPED_RATES = "stopped early (rate at step)"  # the chosen-rate table's list of rates the scheduler stopped
GROUP_SIZE = "quant.group_size"  # the run param of a group-wise quantizer's group size (a record column)
REFERENCE_BITS = 8  # the gap's upper end: 8-bit QLoRA (no registered quantizer stores more bits)


def precision_label(quantizer: str, bits: int, group_size: object = None) -> str:
    """An arm's quantizer as the comparison names it: the registered name with its bit width ('nf4', 'fp4',
    'int8' for LLM.int8, 'int3' for group-wise INT3) and, for a quantizer that reads quant.group_size, the
    group size ('int3-g64'; 'int3-g?' when the record lacks it). A name not in the registry (a label already,
    or '' for runs from before the quantizer tag) is kept as it is."""
    if quantizer not in QUANTIZER_SPECS:
        return quantizer
    label = quantizer if quantizer.endswith(str(bits)) else f"{quantizer}{bits}"
    if "group_size" in quantizer_spec(quantizer).settings:
        label += "-g?" if group_size is None or pd.isna(group_size) else f"-g{int(group_size)}"
    return label


def with_precision_labels(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its quantizer column as precision_label names it (from the bits tag and quant.group_size)."""
    groups = df[GROUP_SIZE] if GROUP_SIZE in df else [None] * len(df)
    labels = [
        precision_label(q, int(b), g) for q, b, g in zip(df[QUANTIZER_TAG], df[BITS_TAG], groups, strict=True)
    ]
    return df.assign(**{QUANTIZER_TAG: labels})


def under(param: str, paths: Sequence[str]) -> bool:
    return any(param == p or param.startswith(p + ".") for p in paths)


def match_keys(df: pd.DataFrame, swept: Sequence[str]) -> list[str]:
    """MATCH_KEYS plus the columns of the other swept or sampled fields (`swept` paths), except the method's own."""
    extra = [
        c
        for c in df.columns
        if under(c, swept) and c.split(".")[0] not in METHOD_SECTIONS and c not in TAGGED_PARAMS
    ]
    return [*MATCH_KEYS, *extra]


def cell_keys(keys: Sequence[str]) -> list[str]:
    """Of a comparison's keys, those that name one cell of a sweep across models and ranks: the model tags,
    the rank and any model.* field. The over-cells comparisons average over them."""
    return [k for k in keys if k in (*MODEL_KEYS, RANK_TAG) or k.split(".")[0] == MODEL_SECTION]


def _strata(runs: pd.DataFrame, cells: Sequence[str]) -> list[pd.DataFrame]:
    """`runs` split by cell (one stratum of everything when `cells` is empty)."""
    return [part for _, part in runs.groupby(list(cells), dropna=False, sort=True)] if cells else [runs]


def final_perplexity(df: pd.DataFrame) -> tuple[str, str]:
    """The column and split of the perplexity after fine-tuning to report: test when the runs have it
    (data.test), else validation (runs from before it, or with data.test unset)."""
    if TEST_PPL_FINAL in df and df[TEST_PPL_FINAL].notna().any():
        return TEST_PPL_FINAL, "test"
    return VAL_PPL_FINAL, "validation"


def rate_chosen_per_seed(compare_across: Sequence[str] | None) -> bool:
    """Whether a sweep's ASHA compared learning rates within each seed (`search.asha.compare_across` names
    the rate and not the seed): a rate may then finish for some seeds only, so each arm's rate is chosen per
    seed, and the comparison still pairs every seed."""
    return bool(compare_across) and LEARNING_RATE in compare_across and SEED_PATH not in compare_across


def choose_learning_rate(
    df: pd.DataFrame, keys: Sequence[str], per_seed: bool = False, stopped: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per arm and every other key but the seed and the learning rate: the learning rate with the lowest mean
    validation perplexity over seeds (``per_seed``: for each seed apart, see rate_chosen_per_seed). Returns
    (the runs at each arm's chosen rate, the table of choices).

    ``stopped``: runs the scheduler stopped early (same columns, and `stopped at step`). They are not chosen
    from, but the table lists them beside the choice they lost to (STOPPED_RATES), and they count among the
    rates tried. The table marks a choice that is the lowest or highest of 3 or more rates tried (with 2,
    every choice is one): that arm's best rate may lie beyond the grid, so its comparison may understate it."""
    fixed = [k for k in keys if k != LEARNING_RATE and (per_seed or k != SEED_TAG)] + ARM
    scored = df.dropna(subset=[VAL_PPL_FINAL])
    per_rate = scored.groupby([*fixed, LEARNING_RATE], as_index=False, dropna=False).agg(
        **{CHOSEN_ON: (VAL_PPL_FINAL, "mean"), "seeds": (SEED_TAG, "nunique")}
    )
    per_rate["rates compared"] = per_rate.groupby(fixed, dropna=False)[LEARNING_RATE].transform("size")
    tried = scored[[*fixed, LEARNING_RATE]]
    if stopped is not None:
        tried = pd.concat([tried, stopped[[*fixed, LEARNING_RATE]]], ignore_index=True)
    bounds = tried.drop_duplicates().groupby(fixed, dropna=False)[LEARNING_RATE]
    bounds = bounds.agg(**{"_lowest": "min", "_highest": "max", "_tried": "size"})
    per_rate = per_rate.join(bounds, on=fixed)
    rate, edge = per_rate[LEARNING_RATE], per_rate["_tried"] >= 3
    per_rate[GRID_EDGE] = ""
    per_rate.loc[edge & (rate == per_rate["_lowest"]), GRID_EDGE] = "lowest"
    per_rate.loc[edge & (rate == per_rate["_highest"]), GRID_EDGE] = "highest"
    chosen = per_rate.loc[per_rate.groupby(fixed, dropna=False)[CHOSEN_ON].idxmin()]
    chosen = chosen.drop(columns=list(bounds.columns)).sort_values(fixed, ignore_index=True)
    if (
        stopped is not None and not stopped.empty
    ):  # '0.01 at 100, 0.001 at 300', with each one's seed when chosen over all seeds
        label = stopped[LEARNING_RATE].map("{:g}".format) + " at " + stopped["stopped at step"].astype(str)
        if not per_seed:
            label += " (seed " + stopped[SEED_TAG].astype(str) + ")"
        lost = stopped.assign(**{STOPPED_RATES: label}).sort_values([LEARNING_RATE, SEED_TAG])
        lost = lost.groupby(fixed, dropna=False)[STOPPED_RATES].agg(", ".join)
        chosen = chosen.join(lost, on=fixed).fillna({STOPPED_RATES: ""})
    runs = df.merge(chosen[[*fixed, LEARNING_RATE]], on=[*fixed, LEARNING_RATE])
    return runs, chosen


def baseline_keys(keys: Sequence[str]) -> list[str]:
    """The keys a method's QLoRA peers are matched on: QLoRA reads no calibration data, so a sweep of
    calibration.* for the calibrated arms pairs each of its values with the same QLoRA runs (which the sweep
    then needs only once; runs that differ in calibration.* alone are the same training, so their mean is kept)."""
    if needs_gram(BASELINE):
        return list(keys)
    return [k for k in keys if k.split(".")[0] != CALIBRATION_SECTION]


def recovered_fraction(df: pd.DataFrame, value: str, keys: Sequence[str] = MATCH_KEYS) -> pd.DataFrame:
    """Per non-gaussian run below REFERENCE_BITS and its peers (`keys`): p4, its value, p8 and the per-seed
    ratio (p4 - p4m) / (p4 - p8), NaN where p4 == p8. p4 is the gaussian run at the method's own precision
    label when the sweep has one (QA-LoRA on INT4 against gaussian INT4, INT3-g64 against gaussian INT3-g64),
    else any gaussian peer of the same bit width (the name p4 is the paper's, whatever the bits); p8 the
    8-bit gaussian peer. An arm without a same-bit baseline or an 8-bit peer is left out."""
    keys, base = list(keys), baseline_keys(keys)
    qlora = df[df[METHOD_TAG] == BASELINE]
    low = qlora[qlora[BITS_TAG] < REFERENCE_BITS]
    same = low.groupby([*base, BITS_TAG, QUANTIZER_TAG], as_index=False, dropna=False)[value].mean()
    any_bits = same.groupby([*base, BITS_TAG], as_index=False, dropna=False)[value].mean()
    reference = qlora[qlora[BITS_TAG] == REFERENCE_BITS].groupby(base, as_index=False, dropna=False)[value]
    reference = reference.mean().rename(columns={value: "p8"})
    arms = df[(df[BITS_TAG] < REFERENCE_BITS) & (df[METHOD_TAG] != BASELINE)]
    arms = arms[[*keys, BITS_TAG, QUANTIZER_TAG, METHOD_TAG, value]]
    merged = arms.merge(same.rename(columns={value: "p4"}), on=[*base, BITS_TAG, QUANTIZER_TAG], how="left")
    merged = merged.merge(any_bits.rename(columns={value: "p4_any"}), on=[*base, BITS_TAG], how="left")
    merged = merged.merge(reference, on=base, how="inner")
    merged["p4"] = merged["p4"].fillna(merged["p4_any"])
    merged = merged.dropna(subset=["p4", "p8", value])
    gap = merged["p4"] - merged["p8"]
    no_gap = gap.abs() < NO_GAP  # nothing to recover
    merged["recovered"] = (merged["p4"] - merged[value]) / gap.mask(no_gap)
    return merged[[*keys, METHOD_TAG, QUANTIZER_TAG, BITS_TAG, "p4", value, "p8", "recovered"]]


def _columns(name: str, interval: Interval) -> dict:
    return {name: interval.estimate, f"{name}_lo": interval.lo, f"{name}_hi": interval.hi}


def _holm_within(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """vs4_holm / vs8_holm: each p-value Holm-adjusted within the arms that share its baseline runs, the
    arms of one cell (`by` without the method) at one precision for vs4, at every precision for vs8."""
    table = table.copy()
    for name, family in (("vs4", [k for k in by if k != METHOD_TAG]),
                         ("vs8", [k for k in by if k not in (METHOD_TAG, QUANTIZER_TAG)])):  # fmt: skip
        p = table[f"{name}_p"]
        table[f"{name}_holm"] = p.groupby([table[k] for k in family] or [0] * len(p), dropna=False).transform(
            holm
        )
    return table


def paired_comparison(
    df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[tuple[str, str, str]], over_cells: bool = False
) -> pd.DataFrame:
    """Per model, arm, rank and other key (seed aside), for each (label, column, split) of `metrics`: the arm
    minus QLoRA at its own precision (vs4: recovered_fraction's p4) and minus 8-bit QLoRA (vs8) as mean paired
    differences over seeds with 95 % paired-t intervals, and the recovered fraction with Fieller's interval
    (orchestrator/paired.py). An arm is its method and precision label (`quantizer`: 'nf4', 'int3-g64'), so
    each bit width and group size has its rows. `straddles_0` names the intervals that contain 0 ('vs 4-bit',
    'vs 3-bit': the arm's own bits; the recovered fraction's contains 0 exactly when that one does). Each
    difference has its t test's p-value (`vs4_p`, `vs8_p`) and that p-value Holm-adjusted within the arms
    sharing its baseline (`vs4_holm`, `vs8_holm`): the intervals are per arm, not simultaneous.

    over_cells: per arm and other key, the same differences averaged over the models and ranks the arm ran in
    (2 or more; `cells` counts them), with stratified intervals. No recovered fraction there: the gap to 8 bits
    differs from cell to cell, and a ratio of averages would weigh the cells by it."""
    cells = cell_keys(keys) if over_cells else []
    by = [k for k in keys if k != SEED_TAG and k not in cells] + [METHOD_TAG, QUANTIZER_TAG]
    # the bits are in the label already; grouped on too, so labels kept as logged ('') never mix bit widths
    parts = []
    for label, value, split in metrics:
        if value not in df or df[value].isna().all():
            continue
        per_seed = recovered_fraction(df, value, keys)
        rows = []
        for (*group, bits), runs in per_seed.groupby([*by, BITS_TAG], dropna=False, sort=True):
            strata = _strata(runs, cells)
            if over_cells and len(strata) < 2:
                continue
            vs4 = stratified_mean_ci([part[value] - part["p4"] for part in strata])
            vs8 = stratified_mean_ci([part[value] - part["p8"] for part in strata])
            ratio = (
                {}
                if over_cells
                else _columns("recovered", ratio_ci(runs["p4"] - runs[value], runs["p4"] - runs["p8"]))
            )
            against = ((f"vs {bits}-bit", vs4), (f"vs {REFERENCE_BITS}-bit", vs8))
            straddles = [name for name, ci in against if ci.straddles_zero]
            rows.append({"metric": label, "split": split, **dict(zip(by, group, strict=True)),
                         **({"cells": len(strata)} if over_cells else {}), "seeds": len(runs),
                         **_columns("vs4", vs4), **_columns("vs8", vs8), **ratio,
                         "vs4_p": vs4.p, "vs8_p": vs8.p, "straddles_0": ", ".join(straddles)})  # fmt: skip
        if rows:
            parts.append(_holm_within(pd.DataFrame(rows), by))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _paired_effect(
    df: pd.DataFrame, by: Sequence[str], field: str, value: str, label: str, over_cells: bool = False
) -> list[dict]:
    """Per group of `df` by `by`: each value of `field` minus its first (sorted), as the mean paired
    difference of `value` over seeds with its 95 % paired-t interval; groups with one value of `field` left out.
    over_cells: averaged over the models and ranks of `by` (cell_keys) instead, paired within each, with a
    stratified interval; groups with fewer than 2 such cells left out."""
    cells = cell_keys(by) if over_cells else []
    by = [k for k in by if k not in cells]
    rows = []
    for group, runs in df.groupby(by, dropna=False, sort=True):
        values = sorted(runs[field].dropna().unique())
        for other in values[1:]:
            strata = [
                _seed_differences(part, field, other, values[0], value) for part in _strata(runs, cells)
            ]
            strata = [d for d in strata if len(d)]
            if over_cells and len(strata) < 2:
                continue
            diff = stratified_mean_ci(strata)
            rows.append({**dict(zip(by, group, strict=True)), "field": label, "value": other, "against": values[0],
                         **({"cells": len(strata)} if over_cells else {}), "seeds": diff.n,
                         **_columns("difference", diff), "CI contains 0": "yes" if diff.straddles_zero else ""})  # fmt: skip
    return rows


def _seed_differences(
    runs: pd.DataFrame, field: str, value_of: object, against: object, value: str
) -> pd.Series:
    """Per seed, `value` where `field` is `value_of` minus where it is `against` (seeds with both)."""
    by_seed = runs.pivot_table(index=SEED_TAG, columns=field, values=value, aggfunc="mean")
    if value_of not in by_seed or against not in by_seed:
        return pd.Series(dtype=float)
    return (by_seed[value_of] - by_seed[against]).dropna()


def calibration_effect(
    df: pd.DataFrame, keys: Sequence[str], value: str, over_cells: bool = False
) -> pd.DataFrame:
    """Does the calibration data matter? Per calibrated arm, model and rank, each value of a swept
    calibration.* field against the first (sorted), as the mean paired difference of `value` over seeds
    with its 95 % paired-t interval. `df` holds each run once per configuration (an arm at its chosen rate,
    which may differ between calibration sets: each is compared at its own). over_cells: see _paired_effect."""
    fields = [k for k in keys if k.split(".")[0] == CALIBRATION_SECTION]
    fixed = [k for k in keys if k not in fields and k not in (LEARNING_RATE, SEED_TAG)] + ARM
    rows = []
    for field in fields:
        rows += _paired_effect(df, fixed + [k for k in fields if k != field], field, value, field, over_cells)
    return pd.DataFrame(rows)


def options_effect(
    df: pd.DataFrame, keys: Sequence[str], value: str, over_cells: bool = False
) -> pd.DataFrame:
    """Does a method's option matter (the SVD-based methods' `split`, ...)? Per method the sweep ran with
    more than one set of init options, and per model, rank, quantizer and other key: each options set
    against the method at its defaults (the method's label without options, METHOD_DEFAULTS), as the mean
    paired difference of `value` over seeds with its 95 % paired-t interval. `df` and over_cells as for
    calibration_effect."""
    parts = df[METHOD_TAG].str.partition(" ")  # report.method_label: 'quailora split-kaiming_a'
    labelled = df.assign(**{METHOD_TAG: parts[0], INIT_OPTIONS: parts[2].replace("", METHOD_DEFAULTS)})
    fixed = [k for k in keys if k not in (LEARNING_RATE, SEED_TAG)] + ARM
    return pd.DataFrame(_paired_effect(labelled, fixed, INIT_OPTIONS, value, "init.options", over_cells))


def comparison_metrics(df: pd.DataFrame, selected: bool) -> list[tuple[str, str, str]]:
    """(label, column, split) of what the paired tables compare. After choosing on validation, the perplexity
    after fine-tuning is the test split's only (no test metric: not shown); perplexity after init does not
    depend on the learning rate."""
    final, split = final_perplexity(df)
    metrics = [] if selected and split != "test" else [("perplexity", final, split)]
    return [*metrics, ("perplexity_init", VAL_PPL_INIT, "validation"), ("accuracy", "accuracy", "lm-eval")]
