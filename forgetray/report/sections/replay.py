"""The replay study (`forgetray replay`): forgetting on never-replayed examples per replay condition,
effects with confidence intervals over (task, seed) units, the per-example description, prediction
quality, every measured (ratio, T) cell and the active-probe evaluation. `paired_tests_table` renders
`forgetray.studies.replay.compare.compare_conditions` results, also used by the iv section.

Reads `replay/results.json`, `replay/probes.json` and `replay/cells/*.json`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from forgetray.report import markup
from forgetray.report.run_view import RunView


def paired_tests_table(tests: Mapping[str, Any], task_t: bool) -> str:
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


def replay_section(run: RunView) -> str:
    """Forgetting on never-replayed examples per replay condition, effects with 95% confidence
    intervals over (task, seed) fine-tunes, the per-example description, prediction quality, and
    the active-probe evaluation (`forgetray replay`, forgetray.studies.replay.study)."""
    results = run.json(run.dir.study("replay"), "results.json")
    probes = run.json(run.dir.study("replay"), "probes.json")
    if results is None and probes is None:
        return markup.note(f"not run yet: {run.command('replay')}")
    if results is not None and "effects" not in results:
        # Not written by this forgetray.studies.replay.study: show what it holds.
        return markup.json_html(results)
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
        parts.append(paired_tests_table(results["per_example_description"], task_t=True))
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
