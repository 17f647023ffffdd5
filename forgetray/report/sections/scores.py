"""The scoring stage: examples, tokens and mean NLL per model (base first) and the change from the base
model; models whose scoring has not finished are listed with their part files.

Reads `scores/<model>/_SUCCESS.json` and counts `scores/<model>/part-*.parquet`.
"""

from __future__ import annotations

import glob
import os

from forgetray.report import markup
from forgetray.report.run_view import RunView
from forgetray.rundir import BASE


def scores_section(run: RunView) -> str:
    """One row per scored model, base first; a note for models whose scoring has not finished."""
    directories = sorted(d for d in glob.glob(run.dir.model_scores("*")) if os.path.isdir(d))
    if not directories:
        return markup.note(f"not run yet: {run.command('run')}")
    names = [os.path.basename(d) for d in directories]
    names.sort(key=lambda n: (n != "base", n))
    base = run.json(run.dir.model_scores(BASE), "_SUCCESS.json")
    base_nll = base.get("mean_nll") if base else None
    rows, pending = [], []
    for name in names:
        summary = run.json(run.dir.model_scores(name), "_SUCCESS.json")
        if summary is None:
            parts = len(glob.glob(os.path.join(run.dir.model_scores(name), "part-*.parquet")))
            pending.append(f"{name} ({parts} part file(s), not complete)")
            continue
        nll = summary.get("mean_nll")
        delta = nll - base_nll if name != "base" and None not in (nll, base_nll) else None
        rows.append([name, summary.get("n_examples"), summary.get("n_tokens"), nll, delta])
    out = (
        markup.table(["model", "examples", "tokens", "mean NLL (nats)", "mean NLL - base"], rows)
        if rows
        else ""
    )
    if pending:
        out += markup.note(
            "scoring in progress: " + ", ".join(pending) + f"; resume with {run.command('run')}"
        )
    return out
