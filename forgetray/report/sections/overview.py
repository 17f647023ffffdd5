"""The run as a whole: the summary (model, N and M, the base model's pretraining, stage timings), the
resolved config and the tail of the log.

Reads `config.yaml`, `models/base.json`, `matrix/index.json`, `scores/base/_SUCCESS.json`,
`checkpoints/` (the tasks fine-tuned so far), `timings.json` and `logs/forgetray.log`.
"""

from __future__ import annotations

import os
from html import escape
from typing import Any

from forgetray.report import markup
from forgetray.report.run_view import RunView
from forgetray.rundir import BASE

LOG_TAIL_LINES = 60
"""Lines of `logs/forgetray.log` shown."""


def summary_section(run: RunView) -> str:
    """Model, N and M (and where they were counted from), the base model's pretraining report, and
    the wall seconds of every stage of every `forgetray run` call."""
    config = run.config() or {}
    base = run.json(run.dir.base_model)
    index = run.json(run.dir.matrix_index)
    base_scores = run.json(run.dir.model_scores(BASE), "_SUCCESS.json")
    checkpoints = run.dir.finetuned_tasks()
    model_config = config.get("model") if isinstance(config.get("model"), dict) else {}
    if base is not None:
        model = base.get("model") or {}
        model_text = str(model.get("path", "?"))
        if model.get("adapter_path"):
            model_text += f" + adapter {model['adapter_path']}"
        if model.get("dtype"):
            model_text += f" ({model['dtype']})"
    elif model_config:
        model_text = f"{model_config.get('name_or_path', '?')} (configured; no models/base.json yet)"
    else:
        model_text = "unknown (no models/base.json)"
    if index is not None:
        n_examples: Any = len(index.get("examples", []))
        n_tasks: Any = len(index.get("tasks", []))
        source = "matrix/index.json"
    else:
        n_examples = base_scores.get("n_examples") if base_scores else None
        n_tasks = len(checkpoints) if checkpoints else None
        source = "base scores and checkpoints (no matrix yet)"
    pairs: list[tuple[str, Any]] = [
        ("run directory", run.dir.location),
        ("model", model_text),
        ("upstream examples N", n_examples),
        ("fine-tuning tasks M", n_tasks),
        ("counted from", source),
    ]
    parts = [markup.kv_table(pairs)]

    parts.append("<h3>Base model pretraining</h3>")
    if base is None:
        parts.append(markup.note(f"not run yet: {run.command('run')}"))
    elif not base.get("pretrain_report"):
        parts.append(
            markup.paragraph("No pretraining report: the base model was not pretrained by forgetray.")
        )
    else:
        report = base["pretrain_report"]
        pairs = [(key, value) for key, value in report.items()]
        before, after = report.get("upstream_nll_before"), report.get("upstream_nll_after")
        if isinstance(before, int | float) and isinstance(after, int | float):
            pairs.insert(2, ("upstream NLL change", after - before))
        parts.append(markup.kv_table(pairs))

    parts.append("<h3>Stage timings (seconds)</h3>")
    timings = run.json(run.dir.timings)
    if not timings:
        parts.append(markup.note(f"no timings.json yet: {run.command('run')}"))
    else:
        stages: list[str] = []
        for entry in timings:
            stages += [s for s in entry.get("seconds", {}) if s not in stages]
        rows = [
            [
                str(entry.get("finished", "?")),
                *[entry["seconds"].get(s) for s in stages],
                float(sum(entry["seconds"].values())),
            ]
            for entry in timings
        ]
        parts.append(markup.table(["finished", *stages, "total"], rows))
    return "".join(parts)


def config_section(run: RunView) -> str:
    """`config.yaml` as written, escaped."""
    if not os.path.exists(run.dir.config):
        return markup.note("no config.yaml: is this a forgetray run directory?")
    with open(run.dir.config, encoding="utf-8") as f:
        return f"<pre>{escape(f.read())}</pre>"


def log_section(run: RunView) -> str:
    """The last `LOG_TAIL_LINES` lines of `logs/forgetray.log`, folded."""
    if not os.path.exists(run.dir.log):
        return markup.note("no logs/forgetray.log yet")
    with open(run.dir.log, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    tail = "".join(lines[-LOG_TAIL_LINES:])
    return (
        f"<details><summary>last {min(len(lines), LOG_TAIL_LINES)} of {len(lines)} lines</summary>"
        f"<pre>{escape(tail)}</pre></details>"
    )
