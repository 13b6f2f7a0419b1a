"""Sweep report: tables per model and bit width, every arm below 8 bits against QLoRA at its own precision and
8-bit QLoRA paired by seed (orchestrator/comparison.py), learning curves, plots, one HTML page.

Works on a plain records table (and a table of learning curves) so it can be tested without MLflow or Ray.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from orchestrator.comparison import (  # noqa: E402
    ARM,
    CALIBRATION_SECTION,
    GROUP_SIZE,
    LEARNING_RATE,
    MATCH_KEYS,
    MODEL_KEYS,
    calibration_effect,
    cell_keys,
    choose_learning_rate,
    comparison_metrics,
    final_perplexity,
    match_keys,
    options_effect,
    paired_comparison,
    rate_chosen_per_seed,
    under,
    with_precision_labels,
)
from orchestrator.curves import PLATEAU_TOLERANCE, PLATEAU_WINDOW, mean_curves, plateau  # noqa: E402
from orchestrator.paired import LEVEL  # noqa: E402
from quailora.initializers import INITIALIZERS, needs_gram  # noqa: E402
from trials.contract import (  # noqa: E402
    BITS_TAG,
    FAMILY_TAG,
    METHOD_TAG,
    MODEL_SIZE_MB,
    QUANTIZER_TAG,
    RANK_TAG,
    REPORT_TAGS,
    SEED_TAG,
    SIZE_TAG,
    STAGES,
    STEP,
    STOPPED_AT_STEP,
    STOPPED_EARLY_TAG,
    TEST_PPL_FINAL,
    VAL_PPL,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
    is_accuracy,
    stage_saved_seconds,
    stage_seconds,
    stage_tag,
)

NA = "n/a"
CHOSEN_TITLE = "Learning rate per arm, chosen on validation (lowest mean val_ppl_final over seeds)"
CHOSEN_PER_SEED_TITLE = (
    "Learning rate per arm and seed, chosen on validation (lowest val_ppl_final of the rates ASHA let finish)"
)
STOPPED_TITLE = "Stopped early by the scheduler (not in the tables above)"
MAX_STEPS = "train.max_steps"  # the trial config field (a run param) of the steps a trial is set to train
STOPPED_VAL_PPL = f"last {VAL_PPL}"
STOPPED_COLUMNS = ["trial", "stopped at step", MAX_STEPS, STOPPED_VAL_PPL]  # the stopped table shows these
PLATEAU_TITLE = (
    f"Plateau: val ppl improved by < {100 * PLATEAU_TOLERANCE:g} % over the last {PLATEAU_WINDOW} steps"
)
STAGES_TITLE = "Cached stages: computed once per key, reused by every other trial"
CALIBRATION_TITLE = (
    "Calibration data: each calibrated arm's final perplexity ({split} split) with one calibration set minus"
    " with another, paired by seed"
)
OPTIONS_TITLE = (
    "Init options: each method's final perplexity ({split} split) with other options minus with its defaults,"
    " paired by seed"
)
PER_VALUE_TITLE = "Paired comparison at each learning rate (every arm at the same rate)"
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
    "from 0). The last column names the intervals that contain 0."
)


NO_BASELINES = (
    "(needs 4-bit and 8-bit gaussian trials at matching rank, seed and other swept fields; "
    "an arm at 3 or 2 bits needs gaussian trials at its own bits in place of the 4-bit ones)"
)


@dataclass
class SweepReport:
    tables: dict[str, pd.DataFrame]  # title -> per (method, rank, other swept field) table
    recovered: pd.DataFrame  # the main paired comparison (comparison.paired_comparison), numeric
    figures: dict[str, bytes]  # file name -> PNG
    recovered_title: str = "Paired comparison by seed"
    chosen_title: str = CHOSEN_TITLE
    # With a learning rate chosen per arm: the rates chosen, and the comparison at each rate as well.
    chosen: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_value: pd.DataFrame = field(default_factory=pd.DataFrame)
    plateau: pd.DataFrame = field(default_factory=pd.DataFrame)  # per arm: did its learning curve flatten
    calibration: pd.DataFrame = field(default_factory=pd.DataFrame)  # comparison.calibration_effect
    calibration_title: str = ""
    options: pd.DataFrame = field(default_factory=pd.DataFrame)  # comparison.options_effect
    options_title: str = ""
    stages: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cached stage: runs and seconds
    stopped: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # stopped by the scheduler: trial, step, val_ppl
    stopped_note: str = ""  # what stopping them saved (steps_saved)
    # The recovered, calibration and options tables averaged over models and ranks (`over_cells`).
    pooled: pd.DataFrame = field(default_factory=pd.DataFrame)
    calibration_pooled: pd.DataFrame = field(default_factory=pd.DataFrame)
    options_pooled: pd.DataFrame = field(default_factory=pd.DataFrame)

    def sections(self) -> list[tuple[str, pd.DataFrame | str, str]]:
        """(title, table or text, float format) in reading order; empty tables left out."""
        parts: list[tuple[str, pd.DataFrame | str, str]] = [
            (t, table, ".3f") for t, table in self.tables.items()
        ]
        parts.append((self.chosen_title, self.chosen, ".3f"))
        if self.recovered.empty:
            parts.append((self.recovered_title, NO_BASELINES, ""))
        else:
            parts.append((self.recovered_title, comparison_display(self.recovered), ""))
        if not self.pooled.empty:
            parts.append((self.recovered_title + OVER_CELLS, comparison_display(self.pooled), ""))
        if not self.per_value.empty:
            parts.append((PER_VALUE_TITLE, comparison_display(self.per_value), ""))
        for title, table, pooled in ((self.calibration_title, self.calibration, self.calibration_pooled),
                                     (self.options_title, self.options, self.options_pooled)):  # fmt: skip
            if not table.empty:
                parts.append((title, _difference_display(table), ""))
            if not pooled.empty:
                parts.append((title + OVER_CELLS, _difference_display(pooled), ""))
        parts += [(PLATEAU_TITLE, self.plateau, ".3f"), (STAGES_TITLE, self.stages, ".1f"),
                  (STOPPED_TITLE, self.stopped.reindex(columns=STOPPED_COLUMNS), ".3f")]  # fmt: skip
        return [(t, _params_shown(c), f) for t, c, f in parts if isinstance(c, str) or not c.empty]

    def _note(self, title: str) -> str:
        if title == STOPPED_TITLE:
            return self.stopped_note
        if title.endswith(OVER_CELLS):
            return OVER_CELLS_NOTE
        return (
            PAIRED_NOTE
            if title in (self.recovered_title, PER_VALUE_TITLE) and not self.recovered.empty
            else ""
        )

    def markdown(self) -> str:
        parts = []
        for title, content, fmt in self.sections():
            if isinstance(content, pd.DataFrame):
                # tabulate writes missingval only for None, not NaN
                shown = content.astype(object).where(content.notna(), None)
                formats = [
                    "g" if "." in str(c) or not fmt else fmt for c in content.columns
                ]  # fields as they are
                content = shown.to_markdown(index=False, floatfmt=formats, missingval=NA)
            note = self._note(title)
            parts.append(f"### {title}\n\n{note + chr(10) * 2 if note else ''}{content}")
        return "\n\n".join(parts)

    def html(self, title: str) -> str:
        body = [f"<h1>{html.escape(title)}</h1>"]
        for name, content, fmt in self.sections():
            body.append(f"<h2>{html.escape(name)}</h2>")
            if self._note(name):
                body.append(f"<p>{html.escape(self._note(name))}</p>")
            if isinstance(content, str):
                body.append(f"<p>{html.escape(content)}</p>")
            else:
                body.append(content.to_html(index=False, na_rep=NA,
                                            float_format=lambda v, f=fmt: format(v, f or "g")))  # fmt: skip
        for name, png in self.figures.items():
            data = base64.b64encode(png).decode()
            body.append(
                f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            )
        style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"

    def write(self, out_dir: Path, title: str) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, png in self.figures.items():
            (out_dir / name).write_bytes(png)
            written.append(out_dir / name)
        for path, text in [
            (out_dir / "report.md", self.markdown()),
            (out_dir / "report.html", self.html(title)),
        ]:
            path.write_text(text)
            written.append(path)
        return written


def _params_shown(content: pd.DataFrame | str) -> pd.DataFrame | str:
    """Field columns ('train.learning_rate') at full precision: the tables' fixed 3 decimals would show 1e-4 as 0."""
    if isinstance(content, str):
        return content
    params = [c for c in content.columns if "." in c and pd.api.types.is_float_dtype(content[c])]
    return content.assign(**{c: content[c].map(lambda v: NA if pd.isna(v) else f"{v:g}") for c in params})


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
    numeric = {f"{name}{suffix}" for name in ("vs4", "vs8", "recovered") for suffix in ("", "_lo", "_hi")}
    shown = comparison[[c for c in comparison.columns if c not in numeric and c != "straddles_0"]].copy()
    estimates = (("vs4", "Δ vs same-bit QLoRA"), ("vs8", "Δ vs 8-bit QLoRA"), ("recovered", "recovered"))
    for name, title in [(n, t) for n, t in estimates if n in comparison]:  # over cells: no recovered
        shown[title] = [
            _interval(*values)
            for values in comparison[[name, f"{name}_lo", f"{name}_hi"]].itertuples(index=False)
        ]
    shown["CI contains 0"] = comparison["straddles_0"]
    return shown


def _difference_display(table: pd.DataFrame) -> pd.DataFrame:
    """A table of paired differences with each estimate and its interval in one cell."""
    shown = table.drop(columns=["difference", "difference_lo", "difference_hi"])
    shown.insert(len(shown.columns) - 1, "difference", [
        _interval(*values) for values in table[["difference", "difference_lo", "difference_hi"]].itertuples(index=False)
    ])  # fmt: skip
    return shown


def _accuracy(records: pd.DataFrame) -> pd.Series:
    acc_cols = [c for c in records.columns if is_accuracy(c)]
    return records[acc_cols].mean(axis=1) if acc_cols else pd.Series(float("nan"), index=records.index)


def normalize(records: pd.DataFrame) -> pd.DataFrame:
    """Typed columns, one `accuracy` column (mean over lm-eval tasks), numeric field params as numbers, and the
    quantizer named by its precision (comparison.precision_label: 'nf4', 'int8', 'int3-g64')."""
    df = records.copy()
    for col in (BITS_TAG, RANK_TAG, SEED_TAG):
        df[col] = pd.to_numeric(df[col]).astype(int)
    for col in (FAMILY_TAG, SIZE_TAG, METHOD_TAG):
        df[col] = df[col].astype(str)
    if QUANTIZER_TAG not in df:
        df[QUANTIZER_TAG] = ""
    params = [c for c in df.columns if "." in c and not pd.api.types.is_numeric_dtype(df[c])]
    for (
        col
    ) in params:  # field params as logged ('train.learning_rate': '0.001'); numbers sort and plot as such
        with contextlib.suppress(ValueError, TypeError):  # not a number: kept as logged
            df[col] = pd.to_numeric(df[col])
    df["accuracy"] = _accuracy(df)
    return with_precision_labels(df)


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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


REFERENCE_BITS = 8  # the upper end of the gap: drawn on the lower-bit panels of the same model


def _line_label(method: str, quantizer: str, extra: dict | None = None) -> str:
    """The method (with its options) and quantizer, then the other fields the line holds: calibration.* only
    for a method that reads calibration data (the others ran once, whatever the field says)."""
    name = method.split()[0]  # method_label: the name, then its options
    calibrated = name in INITIALIZERS and needs_gram(name)
    fields = {k: v for k, v in (extra or {}).items() if k.split(".")[0] != CALIBRATION_SECTION or calibrated}
    label = f"{method} ({quantizer})" if quantizer else method
    return " ".join([label, *(f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float) else
                              f"{k.rsplit('.', 1)[-1]}={v}" for k, v in fields.items())])  # fmt: skip


def _varying(frame: pd.DataFrame, fields: Sequence[str]) -> list[str]:
    """The fields that take more than one value in `frame`: the rest need not be in its lines' labels."""
    return [k for k in fields if frame[k].nunique(dropna=False) > 1]


def _named(fields: Sequence[str], values: Sequence, named: Sequence[str]) -> dict:
    """A line's values of the `named` fields (_varying), for its label."""
    return {k: v for k, v in zip(fields, values, strict=True) if k in named}


def ppl_vs_rank_figure(df: pd.DataFrame, extra: Sequence[str] = ()):
    """One panel per model and bit width below 8: perplexity after fine-tuning against rank (test split when
    the runs have it), one line per method, quantizer and other swept field (`extra`), with the 8-bit runs of
    the same model drawn on the same axes as a dashed segment per rank, so the 4-to-8-bit gap reads off one
    axis. A model with only 8-bit runs keeps its own panel. Constrained layout keeps labels apart."""
    value, split = final_perplexity(df)
    lines = [METHOD_TAG, QUANTIZER_TAG, *extra]
    panels = sorted(df[df.bits != REFERENCE_BITS].groupby([*MODEL_KEYS, "bits"]).groups)
    models = {p[:2] for p in panels}
    panels += sorted(
        k for k in df[df.bits == REFERENCE_BITS].groupby([*MODEL_KEYS, "bits"]).groups if k[:2] not in models
    )
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False, layout="constrained"
    )
    for ax, (family, size, bits) in zip(axes[0], panels, strict=True):
        model = df[(df.family == family) & (df["size"] == size)]
        named = _varying(model, extra)
        for (method, quant, *values), runs in model[model.bits == bits].groupby(lines, dropna=False):
            mean = runs.groupby(RANK_TAG)[value].mean()
            label = _line_label(method, quant, _named(extra, values, named))
            ax.plot(mean.index, mean.values, marker="o", label=label)
        reference = model[model.bits == REFERENCE_BITS] if bits != REFERENCE_BITS else model.iloc[:0]
        for style, ((method, quant, *values), runs) in zip(
            ["--", ":", "-."] * len(reference), reference.groupby(lines, dropna=False), strict=False
        ):
            mean = runs.groupby(RANK_TAG)[value].mean()
            label = _line_label(method, quant, _named(extra, values, named))
            # a third of an octave either side of each rank (the rank axis is log2)
            ax.hlines(mean.values, mean.index * 2**-0.33, mean.index * 2**0.33, colors="black", linestyles=style,
                      label=f"{REFERENCE_BITS}-bit {label}")  # fmt: skip
        ranks = sorted(model[RANK_TAG].unique())
        ax.set(
            title=f"{family} {size}, {bits}-bit", xlabel="LoRA rank", ylabel=f"{split} ppl after fine-tuning"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1, frameon=False)
    return fig


def plot_recovered(comparison: pd.DataFrame) -> bytes:
    """Per family, one bar per method and precision (a method's INT3 and NF4 arms are not averaged together)."""
    ppl = comparison[comparison.metric == "perplexity"]
    ppl = ppl.assign(arm=ppl[METHOD_TAG] + " (" + ppl[QUANTIZER_TAG].fillna("") + ")")
    per_family = ppl.groupby(["family", "arm"], as_index=False).agg(
        mean=("recovered", "mean"), std=("recovered", "std")
    )
    pivot_mean = per_family.pivot(index="family", columns="arm", values="mean")
    pivot_std = per_family.pivot(index="family", columns="arm", values="std").fillna(0)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(pivot_mean) * max(1, len(pivot_mean.columns)) / 2, 3.5))
    pivot_mean.plot.bar(yerr=pivot_std, ax=ax, rot=0)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set(ylabel="recovered fraction of the gap to 8-bit (ppl)", xlabel="family")
    return _png(fig)


def _arm_label(bits: int, method: str, quantizer: str, rate=None, extra: dict | None = None) -> str:
    rate = "" if rate is None else f", lr {rate:g}" if isinstance(rate, float) else f", lr {rate}"
    return f"{bits}-bit {_line_label(method, quantizer, extra)}{rate}"


def curve_panels(keys: Sequence[str]) -> list[str]:
    """What a learning-curve panel holds fixed: model, rank and every other swept field but seed and learning
    rate (an arm's curve is at the rate it is shown at)."""
    return [k for k in keys if k not in (SEED_TAG, LEARNING_RATE)]


def learning_curves(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean val_ppl over seeds per step, per panel and arm (and learning rate, when swept)."""
    rate = [LEARNING_RATE] if LEARNING_RATE in keys else []
    return mean_curves(curves, runs, [*curve_panels(keys), *ARM, *rate])


def plateau_table(mean: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per panel and arm: plateau() of its mean learning curve."""
    by = [c for c in mean.columns if c not in (STEP, VAL_PPL)]
    rows = [
        {**dict(zip(by, group, strict=True)), **plateau(curve.set_index(STEP)[VAL_PPL])}
        for group, curve in mean.groupby(by, dropna=False, sort=True)
    ]
    return pd.DataFrame(rows)


def learning_curves_figure(mean: pd.DataFrame, keys: Sequence[str]):
    """Validation perplexity against optimizer step, one panel per model and rank (two panels a row), one line
    per arm (at its shown learning rate) and other swept field, log scale: the first eval points sit far above
    the rest. A line keeps its color in every panel, and one legend below the panels names them all."""
    # A panel holds a cell fixed (model and rank); any other swept field (a calibration set, ...) is drawn as
    # lines of its own, so an arm sits beside the baselines it is compared with in a figure of a few panels.
    panels = cell_keys(keys)
    fields = [k for k in curve_panels(keys) if k not in panels]
    arm_keys = [*ARM, *([LEARNING_RATE] if LEARNING_RATE in mean.columns else [])]
    named = _varying(mean, fields)

    def label(line: tuple) -> str:
        return _arm_label(*line[: len(arm_keys)], extra=_named(fields, line[len(arm_keys) :], named))

    lines = {
        label(line): line[0] == REFERENCE_BITS
        for line in mean.groupby([*arm_keys, *fields], dropna=False, sort=True).groups
    }
    palette = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    styles = {name: {"color": palette(i % palette.N), "linestyle": "--" if reference else "-", "marker": "."}
              for i, (name, reference) in enumerate(lines.items())}  # fmt: skip
    groups = list(mean.groupby(panels, dropna=False, sort=True))
    ncols = min(len(groups), 2)
    nrows = math.ceil(len(groups) / ncols)
    legend_rows = math.ceil(len(lines) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.2 * nrows + 0.22 * legend_rows),
                             squeeze=False, layout="constrained")  # fmt: skip
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (panel, rows) in zip(axes.flat, groups, strict=False):
        for line, curve in rows.groupby([*arm_keys, *fields], dropna=False, sort=True):
            name = label(line)
            ax.plot(curve[STEP], curve[VAL_PPL], label=name, **styles[name])
        shown = dict(zip(panels, panel, strict=True))
        title = f"{shown.pop(FAMILY_TAG)} {shown.pop(SIZE_TAG)}, rank {shown.pop(RANK_TAG)}"
        title += "".join(f", {k.rsplit('.', 1)[-1]}={v}" for k, v in shown.items())
        ax.set(title=title, xlabel="optimizer step", ylabel="val ppl (mean over seeds)", yscale="log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 30 rather than 2×10¹
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    handles = [Line2D([], [], label=name, **style) for name, style in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)
    return fig


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


def build_report(
    records: pd.DataFrame,
    swept: Sequence[str] = (),
    stopped: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
    rate_per_seed: bool = False,
) -> SweepReport:
    """`swept`: the sweep's swept and sampled field paths; runs that differ in one are never averaged together
    (comparison.match_keys). `stopped`: the trials the scheduler stopped early (stopped_from_mlflow), listed
    apart. `curves`: (run_id, step, val_ppl) rows (curves.curves_from_mlflow) for the learning curves.
    `rate_per_seed`: choose each arm's learning rate per seed (comparison.rate_chosen_per_seed)."""
    df, stopped = normalize(records), pd.DataFrame() if stopped is None else stopped
    keys = match_keys(df, swept)
    extra = keys[len(MATCH_KEYS) :]
    shown, chosen, per_value = df, pd.DataFrame(), pd.DataFrame()
    title, chosen_title = f"Paired comparison by seed ({final_perplexity(df)[1]} split)", CHOSEN_TITLE
    if LEARNING_RATE in keys:  # each arm at its own rate; the same-rate comparison kept below it
        tried = normalize(stopped) if not stopped.empty and LEARNING_RATE in stopped else None
        shown, chosen = choose_learning_rate(df, keys, per_seed=rate_per_seed, stopped=tried)
        per_value = paired_comparison(df, keys, comparison_metrics(df, selected=False))
        compared, metrics = [k for k in keys if k != LEARNING_RATE], comparison_metrics(df, selected=True)
        recovered = paired_comparison(shown, compared, metrics)
        pooled = paired_comparison(shown, compared, metrics, over_cells=True)
        each = "per seed " if rate_per_seed else ""
        title = f"Paired comparison by seed, each arm at its learning rate chosen on validation {each}(final perplexity on test)"
        chosen_title = CHOSEN_PER_SEED_TITLE if rate_per_seed else CHOSEN_TITLE
    else:
        recovered = paired_comparison(df, keys, comparison_metrics(df, selected=False))
        pooled = paired_comparison(df, keys, comparison_metrics(df, selected=False), over_cells=True)
    value, split = final_perplexity(shown)
    calibration = options = calibration_pooled = options_pooled = pd.DataFrame()
    if split == "test" or LEARNING_RATE not in keys:  # what chose a rate never scores it
        calibration, options = calibration_effect(shown, keys, value), options_effect(shown, keys, value)
        calibration_pooled = calibration_effect(shown, keys, value, over_cells=True)
        options_pooled = options_effect(shown, keys, value, over_cells=True)
    figures = {}
    if shown[value].notna().any():
        figures["ppl_vs_rank.png"] = _png(ppl_vs_rank_figure(shown, [k for k in extra if k != LEARNING_RATE]))
    if not recovered.empty and (recovered.metric == "perplexity").any():
        figures["recovered_per_family.png"] = plot_recovered(recovered)
    plateaus = pd.DataFrame()
    if curves is not None and not curves.empty:
        mean = learning_curves(shown, curves, keys)
        if not mean.empty:
            figures["learning_curves.png"] = _png(learning_curves_figure(mean, keys))
            plateaus = plateau_table(mean, keys)
    return SweepReport(
        tables=method_tables(df, extra), recovered=recovered, recovered_title=title, per_value=per_value,
        chosen=chosen, chosen_title=chosen_title, plateau=plateaus, figures=figures,
        stages=stage_table(df if stopped.empty else pd.concat([df, stopped], ignore_index=True)),
        calibration=calibration, calibration_title=CALIBRATION_TITLE.format(split=split),
        options=options, options_title=OPTIONS_TITLE.format(split=split), pooled=pooled,
        calibration_pooled=calibration_pooled, options_pooled=options_pooled,
        stopped=stopped, stopped_note=steps_saved(df, stopped),
    )  # fmt: skip


def _run_record(run, swept: Sequence[str]) -> dict:
    """A child run as a report row: its tags (family, size, bits, method, rank, seed, quantizer), its params
    under the `swept` field paths, its train.max_steps and quant.group_size (part of a group-wise quantizer's
    precision label), and its metrics."""
    tags = run.data.tags
    row = {k: tags.get(k) for k in REPORT_TAGS}
    row[METHOD_TAG] = method_label(row[METHOD_TAG], run.data.params.get("init.options"))
    row.update({f"stage.{stage}": tags.get(stage_tag(stage)) for stage in STAGES})
    row.update({k: v for k, v in run.data.params.items() if under(k, swept)})
    row.update(run.data.metrics, run_id=run.info.run_id, trial=run.info.run_name)
    row[MAX_STEPS] = run.data.params.get(MAX_STEPS)
    row[GROUP_SIZE] = run.data.params.get(GROUP_SIZE)
    return row


def records_from_mlflow(client, parent_run_id: str, swept: Sequence[str] = ()) -> pd.DataFrame:
    """One row per finished child run (_run_record)."""
    from orchestrator.tracking import child_runs

    runs = child_runs(client, parent_run_id)
    return pd.DataFrame([_run_record(run, swept) for run in runs if run.info.status == "FINISHED"])


def stopped_from_mlflow(client, parent_run_id: str, swept: Sequence[str] = ()) -> pd.DataFrame:
    """One row per child run the scheduler stopped early: as records_from_mlflow's, with the step it was
    stopped at and its last val_ppl."""
    from orchestrator.tracking import child_runs

    rows = [
        {
            **_run_record(run, swept),
            "stopped at step": run.data.metrics.get(STOPPED_AT_STEP),
            STOPPED_VAL_PPL: run.data.metrics.get(VAL_PPL),
        }  # fmt: skip
        for run in child_runs(client, parent_run_id)
        if STOPPED_EARLY_TAG in run.data.tags
    ]
    if not rows:
        return pd.DataFrame()
    stopped = pd.DataFrame(rows).sort_values("trial", ignore_index=True)
    stopped[MAX_STEPS] = pd.to_numeric(stopped[MAX_STEPS])  # MLflow keeps params as strings
    return stopped.astype({"stopped at step": "Int64", MAX_STEPS: "Int64"})  # and metrics as floats


def method_label(method: str | None, options_param: str | None) -> str | None:
    """The method with its init options ('quailora split-kaiming_a'): runs that differ in options are different
    arms. Spaces and dashes only, as MLflow metric names (recovered_...) allow."""
    options = json.loads(options_param) if options_param else {}
    return " ".join([str(method), *(f"{k}-{v}" for k, v in sorted(options.items()))]) if options else method


def publish_report(client, state) -> str:
    """Build the report from the sweep's MLflow child runs, write it next to the experiment, log it to the parent run."""
    import tempfile

    from orchestrator.curves import curves_from_mlflow

    sweep = state.sweep_config()
    swept = list(sweep.space)  # grid and sampled fields alike: never averaged over
    records = records_from_mlflow(client, state.parent_run_id, swept)
    stopped = stopped_from_mlflow(client, state.parent_run_id, swept)
    if records.empty:
        return f"sweep {state.name!r}: no finished trials yet ({len(stopped)} stopped early)"
    asha = sweep.search.asha
    per_seed = rate_chosen_per_seed(asha.compare_across if asha else None)
    report = build_report(
        records, swept, stopped, curves_from_mlflow(client, records), rate_per_seed=per_seed
    )
    local = "://" not in state.path
    out_dir = Path(state.path) / "report" if local else Path(tempfile.mkdtemp(prefix="quailora-report-"))
    report.write(out_dir, title=f"quailora sweep {state.name}")
    client.log_artifacts(state.parent_run_id, str(out_dir), artifact_path="report")
    extra = [k for k in match_keys(normalize(records), swept)[len(MATCH_KEYS) :] if k in report.recovered]
    for key, value in recovered_metrics(report.recovered, extra).items():
        client.log_metric(state.parent_run_id, key, value)
    return f"{report.markdown()}\n\nreport: {out_dir / 'report.html'}"


def recovered_metrics(recovered: pd.DataFrame, extra: Sequence[str] = ()) -> dict[str, float]:
    """The paired comparison's recovered fractions as parent-run metrics (none for n/a):
    recovered_<metric>_<family>_<size>_<method>_r<rank>, then _<field>-<value> per `extra` matched field, then
    _<precision label> when the comparison has more than one ('nf4', 'int3-g64'), so a method's arms at
    different bit widths or group sizes do not overwrite each other."""
    precisions = recovered[QUANTIZER_TAG].nunique() > 1 if QUANTIZER_TAG in recovered else False
    metrics = {}
    for row in recovered.to_dict("records"):
        if pd.isna(row["recovered"]):  # no gap to the 8-bit reference: n/a in the report, no metric
            continue
        key = f"recovered_{row['metric']}_{row['family']}_{row['size']}_{row['method']}_r{row['rank']}"
        key += "".join(f"_{c}-{row[c]}" for c in extra)
        key += f"_{row[QUANTIZER_TAG]}" if precisions else ""
        metrics["".join(c if c.isalnum() or c in "_-./" else "_" for c in key)] = row["recovered"]
    return metrics
