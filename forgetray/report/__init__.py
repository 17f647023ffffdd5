"""Figures and the self-contained HTML report of a run directory.

    forgetray report runs/demo      # -> runs/demo/report.html

`plots` draws PNGs from arrays (matplotlib is imported only inside its functions); `html` writes one
offline HTML file with the figures embedded: its `SECTIONS` registry orders the sections (and the table
of contents), each a module of `sections/` that reads the run directory through `run_view.RunView` and
builds its part from `markup`'s escaped tables, numbers and figures.

    html.py            SECTIONS (anchor, title, render), the page around them, build_report,
                       write_report_figures
    run_view.py        RunView: a run directory's inputs, each read once; report_figures/ paths
    markup.py          escaped cells, tables, numbers, notes, embedded PNGs, any JSON as tables
    plots.py           PNG figures (heatmaps, R^2 curve, bars, learning curves, flatness)
    scaling_plots.py   the scaling study's figures; sweep_plots.py: the size sweep's figure
    sections/overview.py     run summary (model, N, M, pretraining, stage timings), config, log tail
    sections/finetune.py     fine-tuning table and learning curves
    sections/scores.py       per-model scoring summaries
    sections/matrix.py       the forgetting matrix: statistics, top tasks and examples, per-task bars
    sections/analysis.py     R^2 of the additive, multiplicative and SVD fits; the heatmaps
    sections/completion.py   completion of held-out tasks (completion_table: any completion result)
    sections/forecast.py     LM-based forecasting in the completion protocol's tables
    sections/replay.py       replay conditions, effects over units, probes (paired_tests_table)
    sections/iv.py           instruction vectors and IV-guided fine-tuning
    sections/scaling.py      Kalajdzievski's linear relation and shifted power laws
    sections/flatness.py     loss-landscape sharpness against forgetting
    sections/exact_match.py  exact-match (binary) forgetting and its completion
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
