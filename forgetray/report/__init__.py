"""Figures and the self-contained HTML report of a run directory.

    forgetray report runs/demo      # -> runs/demo/report.html

`plots` draws PNGs from arrays (matplotlib is imported only inside its functions); `html` reads a run
directory (through `run_view.RunView`) and writes one offline HTML file with the figures embedded,
built from `markup`'s escaped tables, numbers and figures.
"""

from forgetray.report.html import build_report, write_report_figures
from forgetray.report.plots import (
    PAPER_R2_OLMO7B,
    analysis_figures,
    completion_bars,
    per_task_bars,
    r2_curve,
    sorted_heatmap,
    sorted_order,
)

__all__ = [
    "PAPER_R2_OLMO7B",
    "analysis_figures",
    "build_report",
    "completion_bars",
    "per_task_bars",
    "r2_curve",
    "sorted_heatmap",
    "sorted_order",
    "write_report_figures",
]
