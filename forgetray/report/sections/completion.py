"""The complete stage: each completion method's RMSE (and binary metrics) on held-out tasks, with the
protocol (split, revealed entries k, seeds) and bar figures (drawn into `report_figures/`).
`completion_table` is the protocol's table for any result in `evaluate_completion`'s format, also
used by the forecast section.

Reads `completion/results.json`, `completion/binary.json` and `matrix/index.json` (held-out task
names when a result does not carry them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forgetray.report import markup, plots
from forgetray.report.run_view import RunView

COMPLETION_FILES = {"results": "completion_rmse", "binary": "completion_binary"}
"""completion/<name>.json -> the stem of its bar figures in `report_figures/`."""


def completion_figures(run: RunView, name: str) -> list[str]:
    """Bars for completion/<name>.json: RMSE, and F1 when the result has it (binary forgetting)."""
    results = run.json(run.dir.completion, f"{name}.json")
    if results is None or not markup.result_methods(results):
        return []
    stem = COMPLETION_FILES[name]
    paths = [plots.completion_bars(results, run.figure_path(f"{stem}.png"), "rmse")]
    if any(results[m].get("f1_mean") is not None for m in markup.result_methods(results)):
        paths.append(plots.completion_bars(results, run.figure_path(f"{stem}_f1.png"), "f1"))
    return paths


def completion_table(run: RunView, name: str, results: Mapping[str, Any]) -> str:
    """One completion result (`evaluate_completion`'s format): its protocol, each method's metrics,
    and the bars of completion/<name>.json when there are any."""
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
    for path in completion_figures(run, name):
        metric = "F1" if path.endswith("_f1.png") else "RMSE"
        parts.append(
            markup.image(path, f"{metric} of each method on the unrevealed entries, mean ± std over seeds")
        )
    return "".join(parts)


def completion_section(run: RunView) -> str:
    """The real-valued completion result, then the binary one when there is one."""
    results = run.json(run.dir.completion_results)
    binary = run.json(run.dir.completion, "binary.json")
    parts = []
    if results is None:
        parts.append(markup.note(f"not run yet: {run.command('complete')}"))
    else:
        parts += ["<h3>Forgetting (real-valued)</h3>", completion_table(run, "results", results)]
    if binary is not None:
        parts += ["<h3>Binary forgetting</h3>", completion_table(run, "binary", binary)]
    return "".join(parts)
