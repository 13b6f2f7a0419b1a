"""Sweep report: tables per model and bit width, the recovered fraction of the 4-to-8-bit gap, plots, one HTML page.

recovered = (p4 - p4m) / (p4 - p8) with p4 the 4-bit gaussian (QLoRA) value, p4m another 4-bit method
and p8 the 8-bit gaussian value (methods.md), matched on model, rank, seed and every other grid-swept
field except the method's own (init.*, quant.*); n/a where p4 == p8. The same ratio with accuracies.
Sampled (random/Optuna) fields differ per trial, so they are not matched. Works on a plain records
table so it can be tested without MLflow or Ray.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

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
    STOPPED_AT_STEP,
    STOPPED_EARLY_TAG,
    VAL_PPL,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
    is_accuracy,
    stage_saved_seconds,
    stage_seconds,
    stage_tag,
)

BASELINE = "gaussian"
MODEL_KEYS = [FAMILY_TAG, SIZE_TAG]
MATCH_KEYS = [*MODEL_KEYS, RANK_TAG, SEED_TAG]  # from trial tags; the other swept fields come from run params
METHOD_SECTIONS = ("init", "quant")  # where a method differs from its 4- and 8-bit gaussian peers
TAGGED_PARAMS = ("lora.rank", "seed")  # params MATCH_KEYS already carry
NA = "n/a"


@dataclass
class SweepReport:
    tables: dict[str, pd.DataFrame]  # title -> per (method, rank) table
    recovered: pd.DataFrame  # per model, method, rank: mean and std over seeds
    figures: dict[str, bytes]  # file name -> PNG
    stages: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cached stage: runs and seconds
    stopped: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # trials the scheduler stopped: trial, step, val_ppl

    def markdown(self) -> str:
        parts = [
            f"### {title}\n\n{table.to_markdown(index=False, floatfmt='.3f')}"
            for title, table in self.tables.items()
        ]
        if not self.stages.empty:
            parts.append(f"### {STAGES_TITLE}\n\n{self.stages.to_markdown(index=False, floatfmt='.1f')}")
        if not self.stopped.empty:
            parts.append(f"### {STOPPED_TITLE}\n\n{self.stopped.to_markdown(index=False, floatfmt='.3f')}")
        if self.recovered.empty:
            parts.append(
                "### Recovered fraction of the 4-to-8-bit gap\n\n(needs 4-bit and 8-bit gaussian trials at matching rank, seed and other swept fields)"
            )
        else:
            parts.append(
                "### Recovered fraction of the 4-to-8-bit gap\n\n"
                # tabulate writes missingval only for None, not NaN
                + self.recovered.astype(object)
                .where(self.recovered.notna(), None)
                .to_markdown(index=False, floatfmt=".3f", missingval=NA)
            )
        return "\n\n".join(parts)

    def html(self, title: str) -> str:
        body = [f"<h1>{html.escape(title)}</h1>"]
        for name, table in self.tables.items():
            body += [f"<h2>{html.escape(name)}</h2>", table.to_html(index=False, float_format="%.3f")]
        if not self.stages.empty:
            body += [f"<h2>{STAGES_TITLE}</h2>", self.stages.to_html(index=False, float_format="%.1f")]
        if not self.stopped.empty:
            body += [f"<h2>{STOPPED_TITLE}</h2>", self.stopped.to_html(index=False, float_format="%.3f")]
        body += [
            "<h2>Recovered fraction of the 4-to-8-bit gap</h2>",
            self.recovered.to_html(index=False, float_format="%.3f", na_rep=NA),
        ]
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


STOPPED_TITLE = "Stopped early by the scheduler (not in the tables above)"


def _accuracy(records: pd.DataFrame) -> pd.Series:
    acc_cols = [c for c in records.columns if is_accuracy(c)]
    return records[acc_cols].mean(axis=1) if acc_cols else pd.Series(float("nan"), index=records.index)


def normalize(records: pd.DataFrame) -> pd.DataFrame:
    """Typed columns and one `accuracy` column (mean over lm-eval tasks)."""
    df = records.copy()
    for col in (BITS_TAG, RANK_TAG, SEED_TAG):
        df[col] = pd.to_numeric(df[col]).astype(int)
    for col in (FAMILY_TAG, SIZE_TAG, METHOD_TAG):
        df[col] = df[col].astype(str)
    if QUANTIZER_TAG not in df:
        df[QUANTIZER_TAG] = ""
    df["accuracy"] = _accuracy(df)
    return df


def method_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    cols = {VAL_PPL_INIT: "ppl after init", VAL_PPL_FINAL: "ppl after fine-tuning",
            "accuracy": "accuracy", MODEL_SIZE_MB: "model MB"}  # fmt: skip
    present = {k: v for k, v in cols.items() if k in df and df[k].notna().any()}
    tables = {}
    for (family, size, bits), group in df.groupby([*MODEL_KEYS, "bits"], sort=True):
        table = group.groupby(["method", "quantizer", "rank"], as_index=False).agg(
            seeds=("seed", "nunique"), **{label: (col, "mean") for col, label in present.items()}
        )
        tables[f"{family} {size}, {bits}-bit"] = table
    return tables


def _under(param: str, paths: Sequence[str]) -> bool:
    return any(param == p or param.startswith(p + ".") for p in paths)


def match_keys(df: pd.DataFrame, swept: Sequence[str]) -> list[str]:
    """MATCH_KEYS plus the columns of the other grid-swept fields (`swept` paths), except the method's own."""
    extra = [
        c
        for c in df.columns
        if _under(c, swept) and c.split(".")[0] not in METHOD_SECTIONS and c not in TAGGED_PARAMS
    ]
    return [*MATCH_KEYS, *extra]


def recovered_fraction(df: pd.DataFrame, value: str, keys: Sequence[str] = MATCH_KEYS) -> pd.DataFrame:
    """(p4 - p4m) / (p4 - p8) per combination of `keys` and method, from column `value`; NaN where p4 == p8."""
    keys = list(keys)
    base4 = df[(df.bits == 4) & (df.method == BASELINE)]
    base8 = df[(df.bits == 8) & (df.method == BASELINE)]
    base4 = base4.groupby([*keys, "quantizer"], as_index=False)[value].mean()
    base8 = base8.groupby(keys, as_index=False)[value].mean().rename(columns={value: "p8"})
    others = df[(df.bits == 4) & (df.method != BASELINE)][[*keys, "quantizer", "method", value]]
    # Same 4-bit quantizer as the method when the sweep has it (QA-LoRA's INT4), otherwise any 4-bit gaussian run.
    same = others.merge(base4.rename(columns={value: "p4"}), on=[*keys, "quantizer"], how="left")
    any4 = base4.groupby(keys, as_index=False)[value].mean().rename(columns={value: "p4_any"})
    merged = same.merge(any4, on=keys, how="left").merge(base8, on=keys, how="inner")
    merged["p4"] = merged["p4"].fillna(merged["p4_any"])
    merged = merged.dropna(subset=["p4", "p8", value])
    gap = merged["p4"] - merged["p8"]
    merged["recovered"] = (merged["p4"] - merged[value]) / gap.where(gap != 0)  # no gap: nothing to recover
    return merged[[*keys, "method", "p4", value, "p8", "recovered"]]


def summarize_recovered(df: pd.DataFrame, keys: Sequence[str] = MATCH_KEYS) -> pd.DataFrame:
    """Mean and std over seeds of the recovered fraction, per model, method, rank and other matched field."""
    by = [*MODEL_KEYS, "method", *(k for k in keys if k not in (*MODEL_KEYS, "seed"))]
    parts = []
    # perplexity_init: the initialization's own share of the gap, before fine-tuning changes it.
    for value, label in (
        (VAL_PPL_FINAL, "perplexity"),
        (VAL_PPL_INIT, "perplexity_init"),
        ("accuracy", "accuracy"),
    ):
        if value not in df or df[value].isna().all():
            continue
        per_seed = recovered_fraction(df, value, keys)
        if per_seed.empty:
            continue
        summary = per_seed.groupby(by, as_index=False, dropna=False).agg(
            recovered_mean=("recovered", "mean"),
            recovered_std=("recovered", "std"),
            seeds=("seed", "nunique"),
        )
        summary.insert(0, "metric", label)
        parts.append(summary)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


REFERENCE_BITS = 8  # the upper end of the gap: drawn on the lower-bit panels of the same model


def _line_label(method: str, quantizer: str) -> str:
    return f"{method} ({quantizer})" if quantizer else method


def ppl_vs_rank_figure(df: pd.DataFrame):
    """One panel per model and bit width below 8: perplexity after fine-tuning against rank, with the 8-bit runs
    of the same model drawn on the same axes as a dashed segment per rank, so the 4-to-8-bit gap reads off
    one axis. A model with only 8-bit runs keeps its own panel. Constrained layout keeps labels apart."""
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
        for (method, quant), runs in model[model.bits == bits].groupby(["method", "quantizer"]):
            mean = runs.groupby(RANK_TAG)[VAL_PPL_FINAL].mean()
            ax.plot(mean.index, mean.values, marker="o", label=_line_label(method, quant))
        reference = model[model.bits == REFERENCE_BITS] if bits != REFERENCE_BITS else model.iloc[:0]
        for style, ((method, quant), runs) in zip(
            ["--", ":", "-."] * len(reference), reference.groupby(["method", "quantizer"]), strict=False
        ):
            mean = runs.groupby(RANK_TAG)[VAL_PPL_FINAL].mean()
            # a third of an octave either side of each rank (the rank axis is log2)
            ax.hlines(mean.values, mean.index * 2**-0.33, mean.index * 2**0.33, colors="black", linestyles=style,
                      label=f"{REFERENCE_BITS}-bit {_line_label(method, quant)}")  # fmt: skip
        ranks = sorted(model[RANK_TAG].unique())
        ax.set(title=f"{family} {size}, {bits}-bit", xlabel="LoRA rank", ylabel="val ppl after fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    return fig


def plot_ppl_vs_rank(df: pd.DataFrame) -> bytes:
    return _png(ppl_vs_rank_figure(df))


def plot_recovered(summary: pd.DataFrame) -> bytes:
    ppl = summary[summary.metric == "perplexity"]
    per_family = ppl.groupby(["family", "method"], as_index=False).agg(
        mean=("recovered_mean", "mean"), std=("recovered_mean", "std")
    )
    pivot_mean = per_family.pivot(index="family", columns="method", values="mean")
    pivot_std = per_family.pivot(index="family", columns="method", values="std").fillna(0)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(pivot_mean) * max(1, len(pivot_mean.columns)) / 2, 3.5))
    pivot_mean.plot.bar(yerr=pivot_std, ax=ax, rot=0)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set(ylabel="recovered fraction of 4→8-bit gap (ppl)", xlabel="family")
    return _png(fig)


STAGES_TITLE = "Cached stages: computed once per key, reused by every other trial"


def stage_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per stage: how many trials computed, reused or skipped it, the seconds spent computing, and the
    seconds the reuses saved (each reuse saves what computing its entry took)."""
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
                "reused": int((status == "reused").sum()),
                "skipped": int((status == "skipped").sum()),
                "seconds computed": float(df.loc[computed, stage_seconds(stage)].sum()),
                "seconds saved": float(df[stage_saved_seconds(stage)].fillna(0).sum()),
            }
        )
    return pd.DataFrame(rows)


def build_report(
    records: pd.DataFrame, swept: Sequence[str] = (), stopped: pd.DataFrame | None = None
) -> SweepReport:
    """`swept`: the sweep's grid-swept field paths; the recovered fraction matches runs on them (see match_keys).
    `stopped`: the trials the scheduler stopped early (stopped_from_mlflow), listed apart."""
    df = normalize(records)
    recovered = summarize_recovered(df, match_keys(df, swept))
    figures = {"ppl_vs_rank.png": plot_ppl_vs_rank(df)} if df[VAL_PPL_FINAL].notna().any() else {}
    if not recovered.empty and (recovered.metric == "perplexity").any():
        figures["recovered_per_family.png"] = plot_recovered(recovered)
    stopped = pd.DataFrame() if stopped is None else stopped
    return SweepReport(tables=method_tables(df), recovered=recovered, figures=figures, stopped=stopped,
                       stages=stage_table(df))  # fmt: skip


def records_from_mlflow(client, parent_run_id: str, swept: Sequence[str] = ()) -> pd.DataFrame:
    """One row per finished child run: its tags (family, size, bits, method, rank, seed, quantizer), its params
    under the `swept` field paths, and its metrics."""
    from orchestrator.tracking import child_runs

    rows = []
    for run in child_runs(client, parent_run_id):
        if run.info.status != "FINISHED":
            continue
        tags = run.data.tags
        row = {k: tags.get(k) for k in REPORT_TAGS}
        row[METHOD_TAG] = method_label(row[METHOD_TAG], run.data.params.get("init.options"))
        row.update({f"stage.{stage}": tags.get(stage_tag(stage)) for stage in STAGES})
        row.update({k: v for k, v in run.data.params.items() if _under(k, swept)})
        row.update(run.data.metrics, run_id=run.info.run_id, trial=run.info.run_name)
        rows.append(row)
    return pd.DataFrame(rows)


def stopped_from_mlflow(client, parent_run_id: str) -> pd.DataFrame:
    """One row per child run the scheduler stopped early: its name, the step it was stopped at and its last val_ppl."""
    from orchestrator.tracking import child_runs

    rows = [
        {
            "trial": run.info.run_name,
            "stopped at step": run.data.metrics.get(STOPPED_AT_STEP),
            f"last {VAL_PPL}": run.data.metrics.get(VAL_PPL),
        }  # fmt: skip
        for run in child_runs(client, parent_run_id)
        if STOPPED_EARLY_TAG in run.data.tags
    ]
    if not rows:
        return pd.DataFrame()
    stopped = pd.DataFrame(rows).sort_values("trial", ignore_index=True)
    return stopped.astype({"stopped at step": "Int64"})  # MLflow keeps metrics as floats


def method_label(method: str | None, options_param: str | None) -> str | None:
    """The method with its init options ('quailora split-kaiming_a'): runs that differ in options are different
    arms. Spaces and dashes only, as MLflow metric names (recovered_...) allow."""
    options = json.loads(options_param) if options_param else {}
    return " ".join([str(method), *(f"{k}-{v}" for k, v in sorted(options.items()))]) if options else method


def publish_report(client, state) -> str:
    """Build the report from the sweep's MLflow child runs, write it next to the experiment, log it to the parent run."""
    import tempfile

    from orchestrator.sweep_config import GridDomain

    swept = [path for path, domain in state.sweep_config().space.items() if isinstance(domain, GridDomain)]
    records = records_from_mlflow(client, state.parent_run_id, swept)
    stopped = stopped_from_mlflow(client, state.parent_run_id)
    if records.empty:
        return f"sweep {state.name!r}: no finished trials yet ({len(stopped)} stopped early)"
    report = build_report(records, swept, stopped)
    local = "://" not in state.path
    out_dir = Path(state.path) / "report" if local else Path(tempfile.mkdtemp(prefix="quailora-report-"))
    report.write(out_dir, title=f"quailora sweep {state.name}")
    client.log_artifacts(state.parent_run_id, str(out_dir), artifact_path="report")
    extra = match_keys(records, swept)[len(MATCH_KEYS) :]
    for row in report.recovered.to_dict("records"):
        if pd.isna(row["recovered_mean"]):  # no 4-to-8-bit gap: n/a in the report, no metric
            continue
        key = f"recovered_{row['metric']}_{row['family']}_{row['size']}_{row['method']}_r{row['rank']}"
        key += "".join(f"_{c}-{row[c]}" for c in extra)
        client.log_metric(
            state.parent_run_id,
            "".join(c if c.isalnum() or c in "_-./" else "_" for c in key),
            row["recovered_mean"],
        )
    return f"{report.markdown()}\n\nreport: {out_dir / 'report.html'}"
