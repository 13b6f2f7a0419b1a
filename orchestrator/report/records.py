"""The report's input: a sweep's MLflow child runs as a table of records, and `SweepRuns`, those records
normalized with what several sections and figures read from them (the matched keys, the runs each arm is
shown at, the paired comparison, the mean learning curves), each computed once."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import pandas as pd

from orchestrator.comparison import (
    ARM,
    GROUP_SIZE,
    LEARNING_RATE,
    MATCH_KEYS,
    choose_learning_rate,
    comparison_metrics,
    final_perplexity,
    match_keys,
    paired_comparison,
    under,
    with_precision_labels,
)
from orchestrator.curves import mean_curves
from trials.contract import (
    BITS_TAG,
    FAMILY_TAG,
    METHOD_TAG,
    QUANTIZER_TAG,
    RANK_TAG,
    REPORT_TAGS,
    SEED_TAG,
    SIZE_TAG,
    STAGES,
    STOPPED_AT_STEP,
    STOPPED_EARLY_TAG,
    VAL_PPL,
    is_accuracy,
    stage_tag,
)

MAX_STEPS = "train.max_steps"  # the trial config field (a run param) of the steps a trial is set to train
STOPPED_VAL_PPL = f"last {VAL_PPL}"
ZERO_START = "init.zero_start"  # the run param of a zero-correction start (quailora/zero_start.py)


def _run_record(run, swept: Sequence[str]) -> dict:
    """A child run as a report row: its tags (family, size, bits, method, rank, seed, quantizer), its params
    under the `swept` field paths, its train.max_steps and quant.group_size (part of a group-wise quantizer's
    precision label), and its metrics."""
    tags = run.data.tags
    row = {k: tags.get(k) for k in REPORT_TAGS}
    row[METHOD_TAG] = method_label(
        row[METHOD_TAG], run.data.params.get("init.options"), run.data.params.get(ZERO_START)
    )
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


def method_label(
    method: str | None, options_param: str | None, zero_start_param: str | None = None
) -> str | None:
    """The method with its init options ('quailora split-kaiming_a') and, for an init.zero_start run, the word
    zero_start ('svd zero_start'): runs that differ in either are different arms. Spaces and dashes only, as
    MLflow metric names (recovered_...) allow."""
    options = json.loads(options_param) if options_param else {}
    words = [f"{k}-{v}" for k, v in sorted(options.items())]
    if zero_start_param == "True":  # the param is logged only when true (trials/config.py InitSpec)
        words.append(ZERO_START.split(".")[-1])
    return " ".join([str(method), *words]) if words else method


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


def curve_panels(keys: Sequence[str]) -> list[str]:
    """What a learning-curve panel holds fixed: model, rank and every other swept field but seed and learning
    rate (an arm's curve is at the rate it is shown at)."""
    return [k for k in keys if k not in (SEED_TAG, LEARNING_RATE)]


def learning_curves(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean val_ppl over seeds per step, per panel and arm (and learning rate, when swept)."""
    rate = [LEARNING_RATE] if LEARNING_RATE in keys else []
    return mean_curves(curves, runs, [*curve_panels(keys), *ARM, *rate])


@dataclass(eq=False)
class SweepRuns:
    """What every section builder and figure reads. `runs`: the finished runs, normalized. `stopped`: the trials
    the scheduler stopped early (stopped_from_mlflow), as logged. `curves`: (run_id, step, val_ppl) rows
    (curves.curves_from_mlflow). `swept`: the sweep's swept and sampled field paths; runs that differ in one are
    never averaged together (comparison.match_keys). `rate_per_seed`: each arm's learning rate is chosen per
    seed (comparison.rate_chosen_per_seed)."""

    runs: pd.DataFrame
    stopped: pd.DataFrame
    curves: pd.DataFrame
    swept: Sequence[str] = ()
    rate_per_seed: bool = False

    @classmethod
    def of(
        cls,
        records: pd.DataFrame,
        swept: Sequence[str] = (),
        stopped: pd.DataFrame | None = None,
        curves: pd.DataFrame | None = None,
        rate_per_seed: bool = False,
    ) -> SweepRuns:
        """From the records as read (records_from_mlflow): normalized, a missing table as an empty one."""
        empty = pd.DataFrame
        stopped, curves = empty() if stopped is None else stopped, empty() if curves is None else curves
        return cls(normalize(records), stopped, curves, swept, rate_per_seed)

    @cached_property
    def keys(self) -> list[str]:
        """The fields two runs must share to be compared or averaged (comparison.match_keys)."""
        return match_keys(self.runs, self.swept)

    @property
    def extra(self) -> list[str]:
        """The matched fields beyond MATCH_KEYS: the sweep's own."""
        return self.keys[len(MATCH_KEYS) :]

    @property
    def rate_swept(self) -> bool:
        """Each arm is shown at its learning rate chosen on validation, the same-rate comparison kept beside."""
        return LEARNING_RATE in self.keys

    @cached_property
    def _choice(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        if not self.rate_swept:
            return self.runs, pd.DataFrame()
        tried = normalize(self.stopped) if not self.stopped.empty and LEARNING_RATE in self.stopped else None
        return choose_learning_rate(self.runs, self.keys, per_seed=self.rate_per_seed, stopped=tried)

    @property
    def shown(self) -> pd.DataFrame:
        """The runs of each arm at the rate it is shown at: every run when the rate is not swept."""
        return self._choice[0]

    @property
    def chosen(self) -> pd.DataFrame:
        """The learning rate chosen per arm (and seed): empty when the rate is not swept."""
        return self._choice[1]

    @property
    def compared(self) -> list[str]:
        """The keys the paired comparison matches `shown` on: the learning rate is the arm's own once chosen."""
        return [k for k in self.keys if k != LEARNING_RATE]

    @cached_property
    def metrics(self) -> list[tuple[str, str, str]]:
        """The paired comparison's metrics (comparison.comparison_metrics): test only, once a rate was chosen."""
        return comparison_metrics(self.runs, selected=self.rate_swept)

    @cached_property
    def recovered(self) -> pd.DataFrame:
        """The main paired comparison (comparison.paired_comparison), numeric."""
        return paired_comparison(self.shown, self.compared, self.metrics)

    @cached_property
    def _final(self) -> tuple[str, str]:
        return final_perplexity(self.shown)

    @property
    def value(self) -> str:
        """The final perplexity column the shown runs are scored on."""
        return self._final[0]

    @property
    def split(self) -> str:
        """Its split: test when the runs have it."""
        return self._final[1]

    @property
    def scored(self) -> bool:
        """Whether the final perplexity may score the shown runs: never on the split that chose their rate."""
        return self.split == "test" or not self.rate_swept

    @cached_property
    def mean_curves(self) -> pd.DataFrame:
        """learning_curves of the shown runs: empty without curves."""
        return pd.DataFrame() if self.curves.empty else learning_curves(self.shown, self.curves, self.keys)
