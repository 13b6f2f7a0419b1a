"""Learning curves: validation perplexity against optimizer step, per arm, from the runs' MLflow history, and
whether each arm's curve has flattened (the plateau criterion of issue 17)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from trials.contract import STEP, VAL_PPL, VAL_PPL_FINAL, VAL_PPL_INIT

# Plateau: validation perplexity improved by less than PLATEAU_TOLERANCE (relative) over the last
# PLATEAU_WINDOW optimizer steps.
PLATEAU_WINDOW = 100
PLATEAU_TOLERANCE = 0.005
# The knee: the first eval point by which the curve made KNEE_SHARE of its gain from the first to the last
# point. A fixed budget well past it is the other criterion ("a budget past the knee").
KNEE_SHARE = 0.9
KNEE = f"{100 * KNEE_SHARE:g} % of the gain by step"


def curves_from_mlflow(client, records: pd.DataFrame) -> pd.DataFrame:
    """(run_id, step, val_ppl) per run: val_ppl_init at step 0, every eval point, and val_ppl_final at its step
    when no eval point fell there."""
    rows = []
    for record in records.to_dict("records"):
        run_id = record["run_id"]
        points = {m.step: m.value for m in client.get_metric_history(run_id, VAL_PPL)}
        for m in client.get_metric_history(run_id, VAL_PPL_FINAL):
            points.setdefault(m.step, m.value)
        init = record.get(VAL_PPL_INIT)
        if init is not None and math.isfinite(init):
            points.setdefault(0, init)
        rows += [{"run_id": run_id, STEP: step, VAL_PPL: value} for step, value in sorted(points.items())]
    return pd.DataFrame(rows, columns=["run_id", STEP, VAL_PPL])


def mean_curves(curves: pd.DataFrame, runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The mean over seeds of val_ppl at each step, per combination of the `by` columns of `runs`."""
    joined = curves.merge(runs[["run_id", *by]], on="run_id")
    return joined.groupby([*by, STEP], as_index=False, dropna=False)[VAL_PPL].mean()


def plateau(curve: pd.Series) -> dict:
    """For a val_ppl curve indexed by step: its last step and value, the latest eval point at least
    PLATEAU_WINDOW steps earlier, the relative improvement since then, whether it is below
    PLATEAU_TOLERANCE (None when no eval point lies that far back), and the knee (KNEE; None without a gain)."""
    curve = curve.dropna().sort_index()
    last_step, last = int(curve.index[-1]), float(curve.iloc[-1])
    gain = float(curve.iloc[0]) - last
    made = curve.index[float(curve.iloc[0]) - curve >= KNEE_SHARE * gain]
    knee = int(made[0]) if gain > 0 else None
    earlier = curve[curve.index <= last_step - PLATEAU_WINDOW]
    if earlier.empty:
        return {"last step": last_step, "last val_ppl": last, "compared with step": None,
                "improvement %": None, "plateau": None, KNEE: knee}  # fmt: skip
    ref_step, ref = int(earlier.index[-1]), float(earlier.iloc[-1])
    improvement = (ref - last) / ref
    return {"last step": last_step, "last val_ppl": last, "compared with step": ref_step,
            "improvement %": 100 * improvement, "plateau": bool(improvement < PLATEAU_TOLERANCE), KNEE: knee}  # fmt: skip
