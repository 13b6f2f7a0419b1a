"""The report's figures: `FIGURES` names each PNG and the function that draws it from the sweep's runs
(records.SweepRuns), or None where the sweep has nothing to draw."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from orchestrator.comparison import (  # noqa: E402
    ARM,
    CALIBRATION_SECTION,
    LEARNING_RATE,
    MODEL_KEYS,
    cell_keys,
    final_perplexity,
)
from orchestrator.report.records import SweepRuns, curve_panels  # noqa: E402
from quailora.initializers import INITIALIZERS, needs_gram  # noqa: E402
from trials.contract import (  # noqa: E402
    FAMILY_TAG,
    METHOD_TAG,
    QUANTIZER_TAG,
    RANK_TAG,
    SIZE_TAG,
    STEP,
    VAL_PPL,
)

REFERENCE_BITS = 8  # the upper end of the gap: drawn on the lower-bit panels of the same model


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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


def ppl_vs_rank(sweep: SweepRuns) -> bytes | None:
    shown = sweep.shown
    if not shown[sweep.value].notna().any():
        return None
    return _png(ppl_vs_rank_figure(shown, [k for k in sweep.extra if k != LEARNING_RATE]))


def recovered_per_family(sweep: SweepRuns) -> bytes | None:
    recovered = sweep.recovered
    if recovered.empty or not (recovered.metric == "perplexity").any():
        return None
    return plot_recovered(recovered)


def learning_curves_png(sweep: SweepRuns) -> bytes | None:
    mean = sweep.mean_curves
    return None if mean.empty else _png(learning_curves_figure(mean, sweep.keys))


# The report's figures by file name, in the order the HTML page shows them.
FIGURES: dict[str, Callable[[SweepRuns], bytes | None]] = {
    "ppl_vs_rank.png": ppl_vs_rank,
    "recovered_per_family.png": recovered_per_family,
    "learning_curves.png": learning_curves_png,
}
