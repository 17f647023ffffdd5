"""The forgetting matrix Z (tasks x examples): shape, summary statistics, the tasks that cause the most
forgetting, the most-forgotten upstream examples, and mean forgetting per task (drawn into
`report_figures/per_task.png`).

Reads `matrix/forgetting.npy` and `matrix/index.json` (through `RunView.matrix`) and the statistics
of `analysis/fits.json` when the analyse stage wrote them (computed here otherwise).
"""

from __future__ import annotations

import numpy as np

from forgetray.report import markup, plots
from forgetray.report.run_view import RunView

TOP = 10
"""Rows shown of the tables of tasks causing most forgetting and of most-forgotten examples."""


def per_task_figure(run: RunView) -> str | None:
    """Draws `report_figures/per_task.png` (mean forgetting per task); None without a matrix."""
    loaded = run.matrix()
    if loaded is None:
        return None
    z, tasks, _ = loaded
    means = np.mean(z, axis=1, dtype=np.float64)  # (tasks,)
    return plots.per_task_bars(tasks, means, run.figure_path("per_task.png"))


def matrix_section(run: RunView) -> str:
    """Shape and statistics of Z, the top tasks and examples, and the per-task figure."""
    loaded = run.matrix()
    if loaded is None:
        return markup.note(f"not run yet: {run.command('matrix')}")
    z, tasks, examples = loaded
    fits = run.json(run.dir.fits)
    if fits is not None and "statistics" in fits:
        statistics, source = fits["statistics"], "from analysis/fits.json"
    else:
        from forgetray.stats.fits import forgetting_statistics

        statistics, source = forgetting_statistics(z, tasks, examples, top=TOP), "computed for this report"
    parts = [
        markup.kv_table(
            [
                ("shape (tasks x examples)", f"{z.shape[0]:,} x {z.shape[1]:,} ({z.dtype})"),
                ("mean forgetting (nats)", statistics["mean"]),
                ("std", statistics["std"]),
                ("fraction of entries > 0", statistics["fraction_positive"]),
            ]
        ),
        markup.paragraph(f"Statistics {source}.", "meta"),
    ]
    per_task = {row["task"]: row for row in statistics.get("per_task", [])}
    top_tasks = statistics.get("most_forgetting_tasks", [])[:TOP]
    if top_tasks:
        parts.append("<h3>Tasks that cause the most forgetting</h3>")
        rows = [
            [
                t["task"],
                markup.fixed(t["mean"]),
                markup.fixed(per_task.get(t["task"], {}).get("std")),
                markup.fixed(per_task.get(t["task"], {}).get("fraction_positive"), 3),
            ]
            for t in top_tasks
        ]
        parts.append(markup.table(["task", "mean", "std", "fraction > 0"], rows))
    top_examples = statistics.get("most_forgotten_examples", [])[:TOP]
    if top_examples:
        parts.append("<h3>Most-forgotten upstream examples (mean over tasks)</h3>")
        parts.append(
            markup.table(
                ["example", "mean forgetting"],
                [[e["example"], markup.fixed(e["mean"])] for e in top_examples],
            )
        )
    figure = per_task_figure(run)
    if figure is not None:
        parts.append(
            markup.image(figure, "Mean forgetting per task (nats); red: forgetting, blue: improvement")
        )
    return "".join(parts)
