"""The run report: one self-contained HTML file with every table and figure of a run directory.

    forgetray report runs/demo      # writes runs/demo/report.html and prints its path

The file is readable offline and can be mailed on its own: figures are embedded as base64 PNG data
URIs, the CSS is inline, there is no script and no external reference. Every input is optional; a
section whose inputs are missing says which command produces them, and a section whose inputs cannot
be read says why, without stopping the rest of the report. Every text from the run (task names,
example ids, config values) is HTML-escaped.

Each section lives in `forgetray.report.sections` (one module per stage or study) and takes the run's
`RunView`; `SECTIONS` below is their order, and the table of contents is drawn from it.

Figures that need only files already on disk (mean forgetting per task, completion bars, and the R^2
curve when the analyse stage did not draw one) are (re)drawn into `<run>/report_figures/`; the
heatmaps come from the analyse stage (`forgetray.report.plots.analysis_figures`) and are embedded as
found in `<run>/analysis/`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from html import escape
from typing import NamedTuple

from forgetray import __version__, rundir, storage
from forgetray.report import markup
from forgetray.report.run_view import FIGURES_DIR, RunView
from forgetray.report.sections.analysis import analysis_section, r2_figure
from forgetray.report.sections.completion import COMPLETION_FILES, completion_figures, completion_section
from forgetray.report.sections.exact_match import exact_match_section
from forgetray.report.sections.finetune import finetune_section
from forgetray.report.sections.flatness import flatness_section
from forgetray.report.sections.forecast import forecast_section
from forgetray.report.sections.iv import iv_section
from forgetray.report.sections.matrix import matrix_section, per_task_figure
from forgetray.report.sections.overview import config_section, log_section, summary_section
from forgetray.report.sections.replay import replay_section
from forgetray.report.sections.scaling import scaling_section
from forgetray.report.sections.scores import scores_section

__all__ = ["FIGURES_DIR", "SECTIONS", "Section", "build_report", "write_report_figures"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em;
margin-top: 2em; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d4d4d4; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; }
p.note { color: #7a4b00; background: #fff6e0; border-left: 3px solid #e0a100; padding: 0.3em 0.7em; }
p.meta, .caption { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: 0.7em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 0.9em; } code { background: #f3f3f3; padding: 0 0.2em; }
"""


class Section(NamedTuple):
    """One section of the report: `<section id="anchor">` under the heading `title` (the table of
    contents shows the title up to its first colon), its body from `render`."""

    anchor: str
    title: str
    render: Callable[[RunView], str]


SECTIONS: tuple[Section, ...] = (
    Section("summary", "Run summary", summary_section),
    Section("finetune", "Fine-tuning", finetune_section),
    Section("scores", "Scores", scores_section),
    Section("matrix", "Forgetting matrix", matrix_section),
    Section("analysis", "Analysis: how much simple structure explains", analysis_section),
    Section("completion", "Completion: predicting held-out tasks' forgetting", completion_section),
    Section("forecast", "LM-based forecasting: hidden states vs matrix completion", forecast_section),
    Section("replay", "Replay", replay_section),
    Section("iv", "Instruction vectors (Jiang et al. 2024)", iv_section),
    Section("scaling", "Scaling laws for forgetting (Kalajdzievski 2024)", scaling_section),
    Section("flatness", "Flatness: loss landscape and forgetting", flatness_section),
    Section("exact_match", "Exact-match forgetting (binary)", exact_match_section),
    Section("config", "Resolved config", config_section),
    Section("log", "Log", log_section),
)
"""The report's sections in reading order: the page and its table of contents follow it."""


def write_report_figures(run_dir: str | rundir.RunDir) -> list[str]:
    """(Re)draws into `<run>/report_figures/` the figures whose inputs are on disk: mean forgetting per
    task (from the matrix), completion bars (from completion/*.json) and the R^2 curve if the analyse
    stage left none. Returns the paths written."""
    run = RunView(run_dir)
    paths = [per_task_figure(run), r2_figure(run)]
    for name in COMPLETION_FILES:
        paths += completion_figures(run, name)
    return [p for p in paths if p is not None]


def _render(run: RunView) -> str:
    sections = []
    for anchor, title, render in SECTIONS:
        try:
            body = render(run)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            # One unreadable input must not hide the rest of the run.
            body = markup.note(f"could not be rendered: {type(error).__name__}: {error}")
        sections.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{anchor}">{escape(title.split(":")[0])}</a>' for anchor, title, _ in SECTIONS)
    name = os.path.basename(run.dir.location)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>forgetray report: {escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>forgetray report: {escape(name)}</h1>"
        f'<p class="meta">generated {escape(generated)} by forgetray {escape(__version__)}</p>'
        f"<nav>{nav}</nav>{''.join(sections)}</body></html>\n"
    )


def build_report(run_dir: str | rundir.RunDir) -> str:
    """Writes `<run_dir>/report.html` (atomically) from whatever the run directory holds; returns its
    path. Redraws the report figures (`write_report_figures`) on the way."""
    run = RunView(run_dir)
    if not os.path.isdir(run.dir.root):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    storage.write_text(run.dir.report, _render(run))
    return run.dir.report
