"""Paired significance tests between replay conditions: pure numpy / scipy.

Every condition is scored on the same never-replayed examples after fine-tuning on the same tasks,
so conditions are compared pairwise on matched values: over examples (each (task, example) pair
once: forgetting under condition A vs under B) and over tasks (each task's mean forgetting). Both
tests are reported: the Wilcoxon signed-rank test (no normality assumption) and the paired t-test.
With few tasks the over-task tests have little power (3 tasks: the smallest two-sided Wilcoxon
p-value is 0.25), which the result says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

MIN_TASKS_FOR_TEST = 5
"""Below this many tasks the over-task test is still computed but flagged as underpowered."""


def paired_tests(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Tests of mean(a - b) != 0 on matched 1-D arrays: Wilcoxon signed-rank and paired t."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_tests: a {a.shape} and b {b.shape} must be equal 1-D arrays")
    diff = a - b
    out: dict[str, Any] = {
        "n": len(diff),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_difference": float(diff.mean()),
        "share_a_lower": float(np.mean(diff < 0)),
    }
    if len(diff) < 2 or not np.any(diff != 0):
        out.update(wilcoxon_statistic=None, wilcoxon_p=None, t_statistic=None, t_p=None)
        return out
    w = scipy.stats.wilcoxon(a, b)
    t = scipy.stats.ttest_rel(a, b)
    out.update(
        wilcoxon_statistic=float(w.statistic),
        wilcoxon_p=float(w.pvalue),
        t_statistic=float(t.statistic),
        t_p=float(t.pvalue),
    )
    return out


def compare_conditions(forgetting: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """forgetting: {condition: (tasks, examples)} on the same tasks and examples. For each (A, B) in
    `pairs`: tests over examples (all pairs pooled) and over tasks (row means)."""
    out = {}
    for a, b in pairs:
        if a not in forgetting or b not in forgetting:
            continue
        za, zb = forgetting[a], forgetting[b]
        n_tasks = za.shape[0]
        over_tasks = paired_tests(za.mean(axis=1), zb.mean(axis=1))
        over_tasks["underpowered"] = n_tasks < MIN_TASKS_FOR_TEST
        out[f"{a}_vs_{b}"] = {
            "a": a,
            "b": b,
            "over_examples": paired_tests(za.ravel(), zb.ravel()),
            "over_tasks": over_tasks,
            "per_task_over_examples": [paired_tests(za[i], zb[i]) for i in range(n_tasks)],
        }
    return out
