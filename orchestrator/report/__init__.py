"""Sweep report: tables per model and bit width, every arm below 8 bits against QLoRA at its own precision and
8-bit QLoRA paired by seed (orchestrator/comparison.py), learning curves, plots, one HTML page.

`records` reads the sweep's MLflow child runs into a plain table (and `SweepRuns`, what the tables read from
it), `sections` makes the tables (one builder per table, listed in `SECTIONS`), `figures` draws the plots
(`FIGURES`), `render` builds the report and writes markdown and HTML, `publish` logs it to the sweep's parent
run. Everything but `publish` and the MLflow readers works on plain tables, so it is tested without MLflow or
Ray.
"""

from orchestrator.report.figures import FIGURES, learning_curves_figure, plot_recovered, ppl_vs_rank_figure
from orchestrator.report.publish import publish_report, recovered_metrics
from orchestrator.report.records import (
    SweepRuns,
    curve_panels,
    learning_curves,
    method_label,
    normalize,
    records_from_mlflow,
    stopped_from_mlflow,
)
from orchestrator.report.render import SweepReport, build_report
from orchestrator.report.sections import (
    SECTIONS,
    Section,
    comparison_display,
    method_tables,
    plateau_table,
    stage_table,
    steps_saved,
)

__all__ = [
    "FIGURES",
    "SECTIONS",
    "Section",
    "SweepReport",
    "SweepRuns",
    "build_report",
    "comparison_display",
    "curve_panels",
    "learning_curves",
    "learning_curves_figure",
    "method_label",
    "method_tables",
    "normalize",
    "plateau_table",
    "plot_recovered",
    "ppl_vs_rank_figure",
    "publish_report",
    "records_from_mlflow",
    "recovered_metrics",
    "stage_table",
    "steps_saved",
    "stopped_from_mlflow",
]
