"""The report as a reader gets it: `build_report` makes every section (sections.SECTIONS) and figure
(figures.FIGURES) of a sweep's runs, and `SweepReport` renders them as markdown and one self-contained HTML
page."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from orchestrator.report.figures import FIGURES
from orchestrator.report.records import SweepRuns
from orchestrator.report.sections import NA, SECTIONS, Section, SectionBuilder, build_sections

STYLE = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"


@dataclass
class SweepReport:
    """Every builder's sections in reading order (an empty one is not rendered) and the figures by file name.
    `report.<name>` is the table of the section of that name: report.recovered, report.stages, ..."""

    sections: list[Section]
    figures: dict[str, bytes]  # file name -> PNG

    def __getattr__(self, name: str) -> pd.DataFrame:
        for section in self.__dict__.get("sections", ()):
            if section.name == name:
                return section.table
        raise AttributeError(f"{type(self).__name__!r} has no attribute or section {name!r}")

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The per model and bit width tables by title (sections.per_model)."""
        return {s.title: s.table for s in self.sections if s.name == "tables"}

    @property
    def stopped_note(self) -> str:
        """What stopping trials early saved (sections.steps_saved)."""
        return next((s.note for s in self.sections if s.name == "stopped"), "")

    def shown(self) -> list[tuple[Section, pd.DataFrame | str]]:
        """The sections the report shows, each with its content (Section.content)."""
        return [(s, content) for s in self.sections if (content := s.content()) is not None]

    def markdown(self) -> str:
        parts = []
        for section, content in self.shown():
            if isinstance(content, pd.DataFrame):
                # tabulate writes missingval only for None, not NaN
                shown = content.astype(object).where(content.notna(), None)
                fmt = section.floatfmt
                formats = [
                    "g" if "." in str(c) or not fmt else fmt for c in content.columns
                ]  # fields as they are
                content = shown.to_markdown(index=False, floatfmt=formats, missingval=NA)
            note = section.note
            parts.append(f"### {section.title}\n\n{note + chr(10) * 2 if note else ''}{content}")
        return "\n\n".join(parts)

    def html(self, title: str) -> str:
        body = [f"<h1>{html.escape(title)}</h1>"]
        for section, content in self.shown():
            body.append(f"<h2>{html.escape(section.title)}</h2>")
            if section.note:
                body.append(f"<p>{html.escape(section.note)}</p>")
            if isinstance(content, str):
                body.append(f"<p>{html.escape(content)}</p>")
            else:
                body.append(content.to_html(index=False, na_rep=NA,
                                            float_format=lambda v, f=section.floatfmt: format(v, f or "g")))  # fmt: skip
        for name, png in self.figures.items():
            data = base64.b64encode(png).decode()
            body.append(
                f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            )
        return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>"

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


def build_report(
    records: pd.DataFrame,
    swept: Sequence[str] = (),
    stopped: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
    rate_per_seed: bool = False,
    sections: Sequence[SectionBuilder] = SECTIONS,
    figures: Mapping[str, Callable[[SweepRuns], bytes | None]] = FIGURES,
) -> SweepReport:
    """`swept`: the sweep's swept and sampled field paths; runs that differ in one are never averaged together
    (comparison.match_keys). `stopped`: the trials the scheduler stopped early (stopped_from_mlflow), listed
    apart. `curves`: (run_id, step, val_ppl) rows (curves.curves_from_mlflow) for the learning curves.
    `rate_per_seed`: choose each arm's learning rate per seed (comparison.rate_chosen_per_seed). `sections`,
    `figures`: what the report holds (sections.SECTIONS, figures.FIGURES)."""
    sweep = SweepRuns.of(records, swept, stopped, curves, rate_per_seed)
    drawn = {name: draw(sweep) for name, draw in figures.items()}
    pngs = {name: png for name, png in drawn.items() if png is not None}
    return SweepReport(build_sections(sweep, sections), pngs)
