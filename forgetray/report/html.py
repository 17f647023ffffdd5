"""The run report: one self-contained HTML file with every table and figure of a run directory.

    forgetray report runs/demo      # writes runs/demo/report.html and prints its path

The file is readable offline and can be mailed on its own: figures are embedded as base64 PNG data
URIs, the CSS is inline, there is no script and no external reference. Every input is optional; a
section whose inputs are missing says which command produces them, and a section whose inputs cannot
be read says why, without stopping the rest of the report. Every text from the run (task names,
example ids, config values) is HTML-escaped.

Figures that need only files already on disk (mean forgetting per task, completion bars, and the R^2
curve when the analyse stage did not draw one) are (re)drawn into `<run>/report_figures/`; the
heatmaps come from the analyse stage (`forgetray.report.plots.analysis_figures`) and are embedded as
found in `<run>/analysis/`.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from forgetray import __version__, rundir, storage, tracking
from forgetray.report import markup, plots
from forgetray.report.run_view import RunView
from forgetray.report.sections.exact_match import exact_match_section
from forgetray.rundir import BASE

FIGURES_DIR = "report_figures"
"""`<run>/report_figures/`: the figures the report draws itself."""
# Rows shown of long tables (tasks causing most forgetting, most-forgotten examples, log lines).
TOP = 10
LOG_TAIL_LINES = 60

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


# Figures ---------------------------------------------------------------------------------------


def _per_task_figure(run: RunView) -> str | None:
    loaded = run.matrix()
    if loaded is None:
        return None
    z, tasks, _ = loaded
    means = np.mean(z, axis=1, dtype=np.float64)  # (tasks,)
    return plots.per_task_bars(tasks, means, run.dir.path(FIGURES_DIR, "per_task.png"))


def _r2_figure(run: RunView) -> str | None:
    """The R^2 curve, only when fits exist and the analyse stage did not draw it."""
    fits = run.json(run.dir.fits)
    if fits is None or run.exists(run.dir.analysis, "r2_curve.png"):
        return None
    return plots.r2_curve(
        fits["r2_svd"],
        fits["r2_additive"],
        fits["r2_multiplicative"],
        run.dir.path(FIGURES_DIR, "r2_curve.png"),
        reference={plots.paper_reference_label(int(fits.get("n_tasks", 0))): plots.PAPER_R2_OLMO7B},
    )


_COMPLETION_FILES = {"results": "completion_rmse", "binary": "completion_binary"}


def _completion_figures(run: RunView, name: str) -> list[str]:
    """Bars for completion/<name>.json: RMSE, and F1 when the result has it (binary forgetting)."""
    results = run.json(run.dir.completion, f"{name}.json")
    if results is None or not markup.result_methods(results):
        return []
    stem = _COMPLETION_FILES[name]
    paths = [plots.completion_bars(results, run.dir.path(FIGURES_DIR, f"{stem}.png"), "rmse")]
    if any(results[m].get("f1_mean") is not None for m in markup.result_methods(results)):
        paths.append(plots.completion_bars(results, run.dir.path(FIGURES_DIR, f"{stem}_f1.png"), "f1"))
    return paths


def write_report_figures(run_dir: str | rundir.RunDir) -> list[str]:
    """(Re)draws into `<run>/report_figures/` the figures whose inputs are on disk: mean forgetting per
    task (from the matrix), completion bars (from completion/*.json) and the R^2 curve if the analyse
    stage left none. Returns the paths written."""
    run = RunView(run_dir)
    paths = [_per_task_figure(run), _r2_figure(run)]
    for name in _COMPLETION_FILES:
        paths += _completion_figures(run, name)
    return [p for p in paths if p is not None]


# Sections --------------------------------------------------------------------------------------


def _summary(run: RunView) -> str:
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


def _finetune(run: RunView) -> str:
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
    path = plots.learning_curves(curves, run.dir.path(FIGURES_DIR, "learning_curves.png"))
    every = sorted(
        {int(points[1]["step"] - points[0]["step"]) for points in curves.values() if len(points) > 1}
    )
    caption = f"training loss and learning rate by step, one point every {every[0] if every else '?'} step(s)"
    return "<h3>Learning curves</h3>" + markup.image(path, caption)


def _scores(run: RunView) -> str:
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


def _matrix(run: RunView) -> str:
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
    figure = _per_task_figure(run)
    if figure is not None:
        parts.append(
            markup.image(figure, "Mean forgetting per task (nats); red: forgetting, blue: improvement")
        )
    return "".join(parts)


def _analysis_images(run: RunView) -> list[str]:
    """analysis/*.png in reading order: Z, its reconstruction, the residual, the R^2 curve, the rest."""

    def rank(path: str) -> tuple[int, str]:
        name = os.path.basename(path)
        for i, prefix in enumerate(("heatmap.png", "heatmap_rank", "heatmap_residual", "r2_curve")):
            if name.startswith(prefix):
                return i, name
        return 4, name

    return sorted(glob.glob(os.path.join(run.dir.analysis, "*.png")), key=rank)


_ANALYSIS_CAPTIONS = {
    "heatmap.png": "Forgetting matrix Z, rows and columns sorted by mean",
    "heatmap_residual.png": "Residual of the low-rank reconstruction, same order and colour scale",
    "r2_curve.png": "R^2 of the truncated SVD by rank, with the additive and multiplicative fits",
}


def _analysis(run: RunView) -> str:
    fits = run.json(run.dir.fits)
    images = _analysis_images(run)
    parts = []
    if fits is None:
        parts.append(markup.note(f"not run yet: {run.command('analyse')}"))
    else:
        paper = plots.PAPER_R2_OLMO7B
        rows: list[list[Any]] = [
            ["additive (mu + a_i + b_j), least squares", markup.Num(f"{fits['r2_additive']:.3f}"), None],
            [
                "multiplicative (a_i * b_j, = SVD rank 1)",
                markup.Num(f"{fits['r2_multiplicative']:.3f}"),
                None,
            ],
        ]
        if "r2_additive_baseline_only" in fits:
            rows.insert(
                1,
                [
                    "additive, the authors' fit (surprise BaselineOnly, ALS, 100 epochs)",
                    markup.Num(f"{fits['r2_additive_baseline_only']:.3f}"),
                    None,
                ],
            )
        rows += [
            [
                f"SVD rank {k}",
                markup.Num(f"{value:.3f}"),
                markup.Num(f"{paper[k - 1]:.3f}") if k <= len(paper) else None,
            ]
            for k, value in enumerate(fits["r2_svd"], start=1)
        ]
        header = f"R^2 {plots.paper_reference_label(int(fits.get('n_tasks', 0)))}"
        parts.append(markup.table(["fit", f"R^2 (this run, {fits.get('n_tasks')} tasks)", header], rows))
        n, used = fits.get("n_examples"), fits.get("columns_used")
        if fits.get("subsampled"):
            text = (
                f"Fits on a seeded column subsample: {markup.num(used)} of {markup.num(n)} examples "
                f"(seed {fits.get('column_seed', '?')}); statistics use every column."
            )
        else:
            text = f"Fits on all {markup.num(n)} examples (no column subsample)."
        parts.append(markup.paragraph(f"{markup.num(fits.get('n_tasks'))} tasks. {text}", "meta"))
    extra = _r2_figure(run)
    for path in [*images, *([extra] if extra else [])]:
        name = os.path.basename(path)
        caption = _ANALYSIS_CAPTIONS.get(name, name)
        if name.startswith("heatmap_rank"):
            rank = name[len("heatmap_rank") : -len(".png")]
            caption = f"Rank-{rank} SVD reconstruction of Z, same order and colours"
        parts.append(markup.image(path, caption))
    if fits is None and images:
        parts.append(markup.paragraph("Figures above are from an earlier analyse run.", "meta"))
    return "".join(parts)


def _completion_table(run: RunView, name: str, results: Mapping[str, Any]) -> str:
    methods = markup.result_methods(results)
    split = results.get("split") or {}
    train, test = split.get("train_rows", []), split.get("test_rows", [])
    test_tasks = split.get("test_tasks")
    if test_tasks is None and test:
        index = run.json(run.dir.matrix_index)
        if index and "tasks" in index:
            test_tasks = [index["tasks"][i] for i in test if i < len(index["tasks"])]
    seeds = results.get("seeds") or []
    pairs: list[tuple[str, Any]] = [
        ("protocol", results.get("protocol", "forgetray")),
        ("revealed entries per held-out task (k)", results.get("revealed_k")),
        ("seeds", f"{len(seeds)}: {markup.compact(seeds, 60)}"),
        ("training tasks", len(train)),
        ("held-out (test) tasks", len(test)),
    ]
    if test_tasks:
        pairs.append(("held-out task names", ", ".join(str(t) for t in test_tasks)))
    if results.get("binary_threshold") is not None:
        pairs.append(("binary threshold (forgotten: Z > threshold)", results["binary_threshold"]))
    binary_metrics = [m for m in markup.BINARY_METRICS if any(f"{m}_mean" in results[x] for x in methods)]
    headers = [
        "method",
        "RMSE mean ± std",
        "RMSE x100",
        *[f"{markup.BINARY_METRICS[m]} mean ± std" for m in binary_metrics],
    ]
    rows = [
        [
            method,
            markup.Num(markup.pm(results[method]["rmse_mean"], results[method].get("rmse_std"))),
            markup.Num(markup.pm(results[method]["rmse_mean"], results[method].get("rmse_std"), 100.0, 2)),
            *[
                markup.Num(
                    markup.pm(results[method].get(f"{m}_mean"), results[method].get(f"{m}_std"), decimals=3)
                )
                for m in binary_metrics
            ],
            results[method].get("seconds"),
        ]
        for method in methods
    ]
    parts = [markup.kv_table(pairs), markup.table([*headers, "seconds"], rows)]
    for path in _completion_figures(run, name):
        metric = "F1" if path.endswith("_f1.png") else "RMSE"
        parts.append(
            markup.image(path, f"{metric} of each method on the unrevealed entries, mean ± std over seeds")
        )
    return "".join(parts)


def _completion(run: RunView) -> str:
    results = run.json(run.dir.completion_results)
    binary = run.json(run.dir.completion, "binary.json")
    parts = []
    if results is None:
        parts.append(markup.note(f"not run yet: {run.command('complete')}"))
    else:
        parts += ["<h3>Forgetting (real-valued)</h3>", _completion_table(run, "results", results)]
    if binary is not None:
        parts += ["<h3>Binary forgetting</h3>", _completion_table(run, "binary", binary)]
    return "".join(parts)


def _forecast(run: RunView) -> str:
    """The LM-based forecaster (forgetray.studies.forecast.study) in the completion protocol's tables."""
    results = run.json(run.dir.study("forecast"), "results.json")
    if results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(
            f"optional; train and evaluate the forecaster with: {run.command('forecast')}", "meta"
        )
    info = results.get("forecast") or {}
    settings = info.get("settings") or {}
    shape = f"{settings.get('depth')} x {settings.get('hidden_size')} -> {settings.get('dim')}"
    training = ", ".join(str(settings.get(k)) for k in ("tau", "learning_rate", "epochs", "weight_decay"))
    parts = [
        markup.paragraph(
            "Jin & Ren's (ICML 2024) representation-based forecasting, h the base model's final-layer "
            "hidden state at an example's last token. lm_forecast is the authors' forecaster: one "
            "shared head for task and upstream example, score -mean(head(h_task) * head(h_example)) "
            "/ tau + log prior odds of the example being forgotten, BCE on forgotten = Z > 0 over "
            "balanced pairs, LM encoder fine-tuned (forecast.train_encoder); a task's row is the mean "
            "over its sampled examples' logits. It is evaluated on its own labels (Z > 0) in the last "
            "table. frozen_forecast is forgetray's: frozen encoder, score -<f(h_task), g(h_example)> "
            "/ tau + b_example + c with f, g MLPs (a task: its examples' mean state) trained with MSE "
            "(BCE on binary Z); frozen_forecast_calibrated also fits a shrunk offset and scale to the "
            "k revealed entries. All are evaluated in the same call as the completion methods: same "
            "held-out tasks, revealed entries and seeds."
        ),
        markup.kv_table(
            [
                ("representation features", info.get("representation_features")),
                ("f, g: hidden layers x width -> dim", shape),
                ("tau, learning rate, epochs, weight decay", training),
                ("task examples averaged per task", settings.get("n_task_examples")),
                (
                    "frozen_forecast final training loss (standardised Z)",
                    markup.fixed(info.get("final_train_loss")),
                ),
            ]
        ),
        "<h3>Forgetting (real-valued)</h3>",
        _completion_table(run, "forecast", results),
    ]
    completion = run.json(run.dir.completion_results)
    other_split = (completion or {}).get("split", {}).get("test_rows") != results["split"].get("test_rows")
    if completion is not None and other_split:
        parts.append(
            markup.note("the completion section used other held-out tasks (another complete.* config)")
        )
    binary = run.json(run.dir.study("forecast"), "binary.json")
    if binary is not None:
        parts += ["<h3>Binary forgetting</h3>", _completion_table(run, "forecast_binary", binary)]
    authors = run.json(run.dir.study("forecast"), "binary_z0.json")
    if authors is not None:
        trained = (authors.get("forecast") or {}).get("lm_forecast") or {}
        parts += [
            "<h3>Forgotten = Z &gt; 0 (the authors' labels)</h3>",
            markup.paragraph(
                f"lm_forecast: encoder {'fine-tuned' if trained.get('train_encoder') else 'frozen'}, "
                f"BCE {markup.fixed(trained.get('first_train_loss'))} -> "
                f"{markup.fixed(trained.get('final_train_loss'))} (first and last step)",
                "meta",
            ),
            _completion_table(run, "forecast_binary_z0", authors),
        ]
    return "".join(parts)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: a dict of flat dicts as one table (a row each), other dicts as
    key/value tables (nested up to 3 deep), lists of scalars inline, anything deeper as JSON."""
    if _is_scalar(value):
        return f"<p>{escape(markup.num(value) if not isinstance(value, str) else value)}</p>"
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            return f"<p>{escape(markup.compact(value, 400))}</p>"
        if all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            return markup.table(columns, [[v.get(c) for c in columns] for v in value])
        return f"<pre>{escape(markup.compact(value, 2000))}</pre>"
    if not isinstance(value, dict):
        return f"<p>{escape(str(value))}</p>"
    records = {k: v for k, v in value.items() if isinstance(v, dict) and all(_is_flat(x) for x in v.values())}
    parts = []
    if len(records) > 1:
        columns = list(dict.fromkeys(c for v in records.values() for c in v))
        parts.append(
            markup.table(
                ["", *columns], [[k, *[_flat(v.get(c)) for c in columns]] for k, v in records.items()]
            )
        )
    else:
        records = {}
    pairs: list[tuple[str, Any]] = []
    for key, item in value.items():
        if key in records:
            continue
        if _is_scalar(item) or depth >= 2:
            pairs.append((str(key), item if _is_scalar(item) else markup.compact(item)))
        else:
            pairs.append((str(key), markup.Markup(_generic(item, depth + 1))))
    if pairs:
        parts.append(markup.kv_table(pairs))
    return "".join(parts)


def _is_flat(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))


def _flat(value: Any) -> Any:
    return markup.compact(value, 80) if isinstance(value, list) else value


def _paired_tests_table(tests: Mapping[str, Any], task_t: bool) -> str:
    """`forgetray.studies.replay.compare.compare_conditions` results: one row per (A vs B) comparison,
    tests over (task, example) pairs and over task means (`task_t`: with the t test's p too)."""
    rows = []
    for key, test in tests.items():
        e, t = test["over_examples"], test["over_tasks"]
        row = [
            key.replace("_vs_", " vs "),
            markup.fixed(e["mean_difference"]),
            e["n"],
            markup.Num(markup.num(e["wilcoxon_p"])),
            markup.Num(markup.num(e["t_p"])),
            t["n"],
            markup.Num(markup.num(t["wilcoxon_p"])),
        ]
        rows.append([*row, markup.Num(markup.num(t["t_p"]))] if task_t else row)
    headers = ["comparison (A vs B)", "mean A - B", "pairs", "Wilcoxon p", "paired t p", "tasks"]
    headers += ["Wilcoxon p (tasks)", "t p (tasks)"] if task_t else ["Wilcoxon p (tasks)"]
    return markup.table(headers, rows)


def _ci(effect: Mapping[str, Any]) -> markup.Num:
    ci = effect.get("ci95")
    return markup.Num("–" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")


def _replay_effects_table(effects: Mapping[str, Any], verdicts: Mapping[str, str]) -> str:
    """`forgetray.studies.replay.compare.unit_effects`: one row per A vs B, over task x seed units."""
    rows = []
    for key, e in effects.items():
        t = e["over_tasks"]
        rows.append(
            [
                key.replace("_vs_", " vs "),
                markup.Num(f"{e['effect']:+.4f}"),
                _ci(e),
                markup.Num(markup.num(e["t_p"])),
                markup.Num(markup.num(e["wilcoxon_p"])),
                e["n_units"],
                markup.Num(markup.num(t["t_p"])),
                verdicts.get(key, ""),
            ]
        )
    headers = ["comparison (A vs B)", "effect A - B (nats)", "95% CI", "t p (units)", "Wilcoxon p (units)"]
    return markup.table([*headers, "units", "t p (tasks)", "verdict"], rows)


def _replay_cells(run: RunView) -> str:
    """Every (ratio, T) measured in this run: predicted vs random and ground truth vs random."""
    folder = os.path.join(run.dir.study("replay"), "cells")
    if not os.path.isdir(folder):
        return ""
    rows = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        cell = run.json(run.dir.study("replay"), "cells", name)
        if not cell or "effects" not in cell:
            continue
        for key, e in cell["effects"].items():
            if not key.endswith("_vs_random"):
                continue
            rows.append(
                [
                    markup.Num(f"{cell['ratio']:g}"),
                    markup.Num(f"{cell['temperature']:g}"),
                    key.replace("_vs_", " vs "),
                    markup.Num(f"{e['effect']:+.4f}"),
                    _ci(e),
                    markup.Num(markup.num(e["t_p"])),
                    e["n_units"],
                ]
            )
    if not rows:
        return ""
    headers = ["ratio", "T", "comparison", "effect (nats)", "95% CI", "t p (units)", "units"]
    return markup.paragraph("Every measured (ratio, T) of this run, against random replay:") + markup.table(
        headers, rows
    )


def _replay(run: RunView) -> str:
    """Forgetting on never-replayed examples per replay condition, effects with 95% confidence
    intervals over (task, seed) fine-tunes, the per-example description, prediction quality, and
    the active-probe evaluation (`forgetray replay`, forgetray.studies.replay.study)."""
    results = run.json(run.dir.study("replay"), "results.json")
    probes = run.json(run.dir.study("replay"), "probes.json")
    if results is None and probes is None:
        return markup.note(f"not run yet: {run.command('replay')}")
    if results is not None and "effects" not in results:
        return _generic(results)  # not written by this forgetray.studies.replay.study: show what it holds
    parts = []
    if results is not None:
        tasks = results["tasks"]
        parts.append(
            markup.paragraph(
                f"Each of {len(tasks)} held-out tasks fine-tuned with {results['n_seeds']} training "
                f"seeds per condition ({results['units']} task x seed units), {results['mixing']} "
                f"mixing at ratio {results['ratio']:g}; forgetting (nats) measured on "
                f"{results['n_never_replayed']} upstream examples that no condition replays "
                f"(replay pool {results['pool_size']}, T = {results['temperature']:g}, "
                f"{results['revealed_k']} {results['probe']} probes, predictors "
                f"{', '.join(results['predictors'])}). Lower is better."
            )
        )
        rows = [
            [name, markup.fixed(c["mean_forgetting"]), *[markup.fixed(c["per_task"].get(t)) for t in tasks]]
            for name, c in results["conditions"].items()
        ]
        parts.append(markup.table(["condition", "mean forgetting", *tasks], rows))
        parts.append(
            markup.paragraph(
                "Effects over independent units (one fine-tune per task and seed): mean paired "
                "difference, its 95% t-interval and p-values over units; the verdict is the interval."
            )
        )
        parts.append(_replay_effects_table(results["effects"], results.get("verdicts", {})))
        parts.append(
            markup.paragraph(
                "Description only (seeds averaged per task and example; examples of one fine-tune "
                "are not independent, so these p-values are not a verdict):",
                "meta",
            )
        )
        parts.append(_paired_tests_table(results["per_example_description"], task_t=True))
        quality = [
            [t, m, markup.fixed(q["rmse"]), markup.fixed(q["pearson"], 3), markup.fixed(q["spearman"], 3)]
            for t, per in results["prediction_on_pool"].items()
            for m, q in per.items()
        ]
        parts.append(markup.table(["task", "predictor", "prediction RMSE", "Pearson", "Spearman"], quality))
        parts.append(_replay_cells(run))
    if probes is not None:
        rows = []
        for method, per in probes.items():
            if not isinstance(per, dict) or "random" not in per:
                continue
            for strategy, v in per.items():
                rows.append(
                    [
                        method,
                        strategy,
                        markup.pm(v["rmse_mean"], v["rmse_std"], 100, 2),
                        markup.Num(markup.num(v.get("beats_random_seeds"))),
                    ]
                )
        parts.append(
            markup.paragraph(
                f"Active probe selection: completion RMSE x100, leave-one-task-out, k = {probes['k']}, "
                f"random over {len(probes['seeds'])} seeds."
            )
        )
        parts.append(markup.table(["method", "probes", "RMSE x100", "share of random seeds beaten"], rows))
    return "".join(parts)


def _iv(run: RunView) -> str:
    """Instruction vectors per task and IV-guided vs plain fine-tuning (`forgetray iv RUN [--train]`,
    forgetray.studies.iv.study)."""
    summary = run.json(run.dir.study("iv"), "summary.json")
    results = run.json(run.dir.study("iv"), "results.json")
    if summary is None and results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(
            f"optional; extract with {run.command('iv')}, compare fine-tuning with --train", "meta"
        )
    parts = []
    if summary is not None:
        tasks = summary["tasks"]
        parts.append(
            markup.paragraph(
                "Heads ranked by indirect effect: the mean change of P(first answer token) when the "
                "head's mean output over the task's prompts is patched into prompts with the "
                "instruction removed. The instruction vector is the sum of the top heads' outputs "
                "through the output projection, added to the residual stream entering the given layer."
            )
        )
        rows = [
            [
                task,
                ", ".join(
                    f"L{h[0]}H{h[1]} ({e:+.3f})"
                    for h, e in zip(s["heads"][:5], s["head_effects"][:5], strict=False)
                ),
                s["layer"],
                markup.fixed(s["vector_norm"], 3),
                markup.fixed(s["p_answer_clean"], 3),
                markup.fixed(s["p_answer_corrupted"], 3),
            ]
            for task, s in tasks.items()
        ]
        parts.append(
            markup.table(
                [
                    "task",
                    "top heads (indirect effect)",
                    "layer",
                    "|IV|",
                    "P(answer)",
                    "P(answer), no instruction",
                ],
                rows,
            )
        )
    if results is not None:
        tasks = results["tasks"]
        conditions = results["conditions"]
        parts.append(
            markup.paragraph(
                f"IV-guided vs plain fine-tuning of {len(tasks)} tasks (same config and seed): forgetting is "
                f"the mean increase of the run's score ({results['metric']}) over the base model on "
                f"{results['n_examples']} upstream examples; task loss is the mean response NLL on the "
                "task's own examples. Lower is better for both."
            )
        )
        rows = [
            [
                name,
                markup.fixed(c["mean_forgetting"]),
                *[markup.fixed(c["per_task"].get(t)) for t in tasks],
                markup.fixed(c["mean_task_loss"]),
            ]
            for name, c in conditions.items()
        ]
        parts.append(markup.table(["condition", "mean forgetting", *tasks, "mean task loss"], rows))
        parts.append(_paired_tests_table(results["tests"], task_t=False))
    return "".join(parts)


def _power_law_row(name: str, fit: Mapping[str, Any]) -> list[Any]:
    if "error" in fit:
        return [name, markup.Markup(escape(str(fit["error"]))), *[""] * 9]
    return [
        name,
        *(markup.Num(markup.num(fit[k])) for k in ("c", "a", "alpha", "b", "beta", "rho", "s")),
        markup.fixed(fit["r2"], 3),
        markup.fixed(fit.get("p_term_share"), 3),
        ", ".join(fit.get("at_bounds", [])) or "none",
    ]


def _scaling(run: RunView) -> str:
    """Kalajdzievski 2024's laws from `forgetray scaling` (`<run>/scaling/`)."""
    fits = run.json(run.dir.study("scaling"), "fits.json")
    if fits is None:
        return markup.note("not run: forgetray scaling CONFIG (e.g. configs/scaling.yaml)")
    linear = fits["linear"]
    parts = [
        markup.paragraph(
            f"Task {fits.get('task')}: LoRA ranks {fits['ranks']} (parameters fine-tuned P: "
            f"{', '.join(f'{int(v):,}' for v in fits['n_params'].values())}); {fits['n_points']} points "
            f"with steps N >= {fits['min_step']}. L_f: mean cross-entropy of the fine-tuned model against "
            "the base model's next-token distribution on the upstream sample; L_ft: mean token NLL on "
            "a fixed sample of the task's training examples."
        ),
        "<h3>(a) Linear relation L_f = -c · L_ft + s</h3>",
        markup.note(f"fit failed: {linear['error']}")
        if "error" in linear
        else markup.kv_table(
            [
                ("c", markup.fixed(linear["c"])),
                ("s", markup.fixed(linear["s"])),
                ("R²", markup.fixed(linear["r2"], 3)),
            ]
        ),
        "<h3>(b) Shifted power laws L(P, N) = c · [(a / P)^α + (b / N)^β]^ρ + s</h3>",
        markup.paragraph(
            "|c| is fixed to 1 (the form has one redundant scale, absorbed into a and b). P-term share: "
            "mean of (a/P)^α / [(a/P)^α + (b/N)^β] over the points (near 0: no dependence on P left). "
            "Constants on a search bound are not determined by the data."
        ),
        markup.table(
            ["quantity", "c", "a", "α", "b", "β", "ρ", "s", "R²", "P-term share", "on a bound"],
            [
                _power_law_row("L_ft (fine-tuning loss)", fits["power_law_l_ft"]),
                _power_law_row("L_f (forgetting)", fits["power_law_l_f"]),
            ],
        ),
    ]
    if "l_f_via_linear" in fits:
        parts.append(
            markup.paragraph(
                f"L_f from the L_ft law through the linear relation: R² {fits['l_f_via_linear']['r2']:.3f}."
            )
        )
    by_rank = fits.get("r2_by_rank", {})
    if by_rank:
        ranks = sorted({r for d in by_rank.values() for r in d}, key=int)
        parts += [
            "<h3>Where the fits break: R² within each rank</h3>",
            markup.table(
                ["fit", *[f"rank {r}" for r in ranks]],
                [[k, *[d.get(r) for r in ranks]] for k, d in by_rank.items()],
            ),
        ]
    rows = fits.get("r2_by_min_step", [])
    if rows:
        parts += [
            "<h3>R² as early steps are excluded</h3>",
            markup.table(
                ["min step", "points", "linear", "L_ft law", "L_f law"],
                [
                    [
                        r["min_step"],
                        r["n_points"],
                        r.get("r2_linear"),
                        r.get("r2_power_law_l_ft"),
                        r.get("r2_power_law_l_f"),
                    ]
                    for r in rows
                ],
            ),
        ]
    for name, caption in (
        ("linear_relation.png", "L_f against L_ft, every rank and step"),
        ("power_law_l_ft.png", "fine-tuning loss against steps, with the fitted law"),
        ("power_law_l_f.png", "forgetting against steps, with the fitted law"),
    ):
        if run.exists(run.dir.study("scaling"), name):
            parts.append(markup.image(os.path.join(run.dir.study("scaling"), name), caption))
    return "".join(parts)


def _flatness(run: RunView) -> str:
    """Sharpness figures per model (forgetray.studies.flatness.measure) and their rank correlation
    with forgetting."""
    results = run.json(run.dir.study("flatness"), "figures.json")
    if results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(f"optional; draw the loss landscapes with: {run.command('flatness')}", "meta")
    from forgetray.studies.flatness.measure import FIGURES

    settings = results["settings"]
    forgetting = results.get("mean_forgetting", {})
    parts = [
        markup.paragraph(
            f"Loss ({settings['data']} sample of {settings['n_examples']} examples) on a "
            f"{settings['resolution']} x {settings['resolution']} grid over [-{settings['span']}, "
            f"{settings['span']}]^2 of two filter-normalised random directions around each model; "
            "definitions in forgetray/studies/flatness/measure.py. Smaller is flatter. With upstream data, "
            "centre_loss "
            "is the model's upstream loss on the sample, a check against the matrix."
        ),
        markup.table(
            ["model", *FIGURES, "task loss", "mean forgetting"],
            [
                [
                    name,
                    *[markup.fixed(row[f]) for f in FIGURES],
                    markup.fixed(row.get("task_loss")),
                    markup.fixed(forgetting.get(name)),
                ]
                for name, row in results["models"].items()
            ],
        ),
        "<h3>Flatness vs forgetting across tasks (Spearman)</h3>",
        markup.table(
            ["figure", "rho", "p-value", "tasks"],
            [
                [name, markup.fixed(v["rho"], 3), markup.fixed(v["p_value"], 3), v["n"]]
                for name, v in results["spearman_vs_mean_forgetting"].items()
            ],
        ),
    ]
    if run.exists(run.dir.study("flatness"), "flatness_vs_forgetting.png"):
        parts.append(
            markup.image(
                os.path.join(run.dir.study("flatness"), "flatness_vs_forgetting.png"),
                "sharpness figures vs mean forgetting",
            )
        )
    for name in ("base", *[n for n in results["models"] if n != "base"][:1]):
        if run.exists(run.dir.study("flatness"), f"landscape_{name}.png"):
            parts.append(
                markup.image(
                    os.path.join(run.dir.study("flatness"), f"landscape_{name}.png"),
                    f"loss landscape: {name}",
                )
            )
    return "".join(parts)


def _exact_match(run: RunView) -> str:
    """Exact-match (binary) forgetting, an optional stage (`forgetray exact-match`)."""
    return exact_match_section(run)


def _config(run: RunView) -> str:
    if not os.path.exists(run.dir.config):
        return markup.note("no config.yaml: is this a forgetray run directory?")
    with open(run.dir.config, encoding="utf-8") as f:
        return f"<pre>{escape(f.read())}</pre>"


def _log(run: RunView) -> str:
    if not os.path.exists(run.dir.log):
        return markup.note("no logs/forgetray.log yet")
    with open(run.dir.log, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    tail = "".join(lines[-LOG_TAIL_LINES:])
    return (
        f"<details><summary>last {min(len(lines), LOG_TAIL_LINES)} of {len(lines)} lines</summary>"
        f"<pre>{escape(tail)}</pre></details>"
    )


_SECTIONS: list[tuple[str, str, Callable[[RunView], str]]] = [
    ("summary", "Run summary", _summary),
    ("finetune", "Fine-tuning", _finetune),
    ("scores", "Scores", _scores),
    ("matrix", "Forgetting matrix", _matrix),
    ("analysis", "Analysis: how much simple structure explains", _analysis),
    ("completion", "Completion: predicting held-out tasks' forgetting", _completion),
    ("forecast", "LM-based forecasting: hidden states vs matrix completion", _forecast),
    ("replay", "Replay", _replay),
    ("iv", "Instruction vectors (Jiang et al. 2024)", _iv),
    ("scaling", "Scaling laws for forgetting (Kalajdzievski 2024)", _scaling),
    ("flatness", "Flatness: loss landscape and forgetting", _flatness),
    ("exact_match", "Exact-match forgetting (binary)", _exact_match),
    ("config", "Resolved config", _config),
    ("log", "Log", _log),
]


def _render(run: RunView) -> str:
    sections = []
    for anchor, title, render in _SECTIONS:
        try:
            body = render(run)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            # One unreadable input must not hide the rest of the run.
            body = markup.note(f"could not be rendered: {type(error).__name__}: {error}")
        sections.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{anchor}">{escape(title.split(":")[0])}</a>' for anchor, title, _ in _SECTIONS)
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
