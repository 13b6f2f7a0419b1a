"""The report of a sweep's MLflow child runs, written next to the experiment and logged to its parent run,
with the recovered fractions as parent-run metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from orchestrator.comparison import MATCH_KEYS, match_keys, rate_chosen_per_seed
from orchestrator.report.records import normalize, records_from_mlflow, stopped_from_mlflow
from orchestrator.report.render import build_report
from trials.contract import QUANTIZER_TAG


def publish_report(client, state, follow_ups: Sequence = ()) -> str:
    """Build the report from the sweep's MLflow child runs, and those of ``follow_ups`` (experiment states
    on the same tracking store, orchestrator/report/joined.py), write it next to the experiment, log it to
    its parent run."""
    import tempfile

    from orchestrator.curves import curves_from_mlflow
    from orchestrator.report.joined import joined_swept

    sweep = state.sweep_config()
    # grid and sampled fields alike, of every joined sweep: never averaged over
    swept = joined_swept(sweep, [other.sweep_config() for other in follow_ups])
    parents = [state.parent_run_id, *(other.parent_run_id for other in follow_ups)]
    records = _joined([records_from_mlflow(client, p, swept) for p in parents])
    stopped = _joined([stopped_from_mlflow(client, p, swept) for p in parents])
    if records.empty:
        return f"sweep {state.name!r}: no finished trials yet ({len(stopped)} stopped early)"
    asha = sweep.search.asha
    per_seed = rate_chosen_per_seed(asha.compare_across if asha else None)
    report = build_report(
        records, swept, stopped, curves_from_mlflow(client, records), rate_per_seed=per_seed
    )
    local = "://" not in state.path
    out_dir = Path(state.path) / "report" if local else Path(tempfile.mkdtemp(prefix="quailora-report-"))
    title = " + ".join([state.name, *(other.name for other in follow_ups)])
    report.write(out_dir, title=f"quailora sweep {title}")
    client.log_artifacts(state.parent_run_id, str(out_dir), artifact_path="report")
    extra = [k for k in match_keys(normalize(records), swept)[len(MATCH_KEYS) :] if k in report.recovered]
    for key, value in recovered_metrics(report.recovered, extra).items():
        client.log_metric(state.parent_run_id, key, value)
    return f"{report.markdown()}\n\nreport: {out_dir / 'report.html'}"


def _joined(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The sweeps' tables as one; an empty one (a sweep with no such runs) adds nothing, dtypes included."""
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
