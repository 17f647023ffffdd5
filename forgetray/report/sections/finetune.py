"""The fine-tuning stage: one row per task (steps, final loss, seconds, resumption) and the learning
curves of every task in one figure (drawn into `report_figures/learning_curves.png`).

Reads `checkpoints/<task>.json` (the pointer files, through `RunView.checkpoints`) and
`curves/<task>.json`.
"""

from __future__ import annotations

from collections.abc import Sequence

from forgetray import tracking
from forgetray.report import markup, plots
from forgetray.report.run_view import RunView


def finetune_section(run: RunView) -> str:
    """One row per fine-tuned task (with totals over tasks), then the learning curves."""
    pointers = run.checkpoints()
    if not pointers:
        return markup.note(f"not run yet: {run.command('run')}")
    rows = [
        [
            str(p.get("task", "?")),
            str(p.get("method", "?")),
            p.get("steps"),
            p.get("loss"),
            p.get("train_seconds"),
            p.get("wall_seconds"),
            p.get("resumed_from_step"),
        ]
        for p in pointers
    ]
    wall = [p.get("wall_seconds") for p in pointers]
    total = None
    if len(pointers) > 1 and all(isinstance(w, int | float) for w in wall):
        train = [p.get("train_seconds") or 0.0 for p in pointers]
        total = ["total", "", None, None, float(sum(train)), float(sum(wall)), None]
    headers = ["task", "method", "steps", "final loss", "train seconds", "wall seconds", "resumed from step"]
    return markup.table(headers, rows, total) + _learning_curves(run, [str(p.get("task")) for p in pointers])


def _learning_curves(run: RunView, tasks: Sequence[str]) -> str:
    """Each task's curve from `<run>/curves/<task>.json` (kept whatever the tracking backend)."""
    curves = {t: points for t in tasks if (points := tracking.read_curve(run.dir, t))}
    if not curves:
        return markup.note(
            "no learning curves (curves/<task>.json): this run was trained before they were kept"
        )
    path = plots.learning_curves(curves, run.figure_path("learning_curves.png"))
    every = sorted(
        {int(points[1]["step"] - points[0]["step"]) for points in curves.values() if len(points) > 1}
    )
    caption = f"training loss and learning rate by step, one point every {every[0] if every else '?'} step(s)"
    return "<h3>Learning curves</h3>" + markup.image(path, caption)
